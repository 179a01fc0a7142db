"""Prompt sets (built-in and users' files) and chat formatting."""

from __future__ import annotations

import json

import pytest
from tiny import tokenizer

from refusal_edit.errors import RefusalEditError
from refusal_edit.prompts import builtin, chat_format, load_prompts


def test_builtin_sets_have_fixed_categorised_splits():
    for kind in ("harmful", "harmless"):
        ps = builtin(kind)
        assert len(ps) == 400
        assert len(set(ps.categories)) == 10
        assert [len(ps.split(s)) for s in ("train", "val", "test")] == [240, 60, 100]
        assert len(set(ps.instructions)) == 400
    assert not set(builtin("harmful").instructions) & set(builtin("harmless").instructions)


def test_sample_is_balanced_over_categories():
    val = builtin("harmful").split("val")
    sample = val.sample(20)
    counts = {c: sample.categories.count(c) for c in set(sample.categories)}
    assert len(counts) == 10 and set(counts.values()) == {2}
    assert val.sample(1000) is val


@pytest.mark.parametrize("suffix", ["txt", "json", "jsonl", "csv", "parquet"])
def test_user_files_in_every_format(tmp_path, suffix):
    rows = [{"prompt": "first thing", "category": "a"}, {"prompt": "second thing", "category": "b"}]
    path = tmp_path / f"p.{suffix}"
    if suffix == "txt":
        path.write_text("first thing\n\nsecond thing\n")
    elif suffix == "json":
        path.write_text(json.dumps(rows))
    elif suffix == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    elif suffix == "csv":
        path.write_text("prompt,category\nfirst thing,a\nsecond thing,b\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    ps = load_prompts(str(path))
    assert ps.instructions == ["first thing", "second thing"]
    if suffix != "txt":
        assert ps.categories == ["a", "b"]


def test_column_selection_and_json_strings(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"q": "x1", "goal": "g1"}\n{"q": "x2", "goal": "g2"}\n')
    assert load_prompts(str(path)).instructions == ["g1", "g2"]
    assert load_prompts(f"{path}#q").instructions == ["x1", "x2"]
    (tmp_path / "s.json").write_text(json.dumps(["a", "b"]))
    assert load_prompts(str(tmp_path / "s.json")).instructions == ["a", "b"]


def test_hf_dataset_source(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"behavior": ["do x", "do y", "do z"]}).to_parquet(str(tmp_path / "train.parquet"))
    ps = load_prompts(f"hf:{tmp_path}@train#behavior")
    assert ps.instructions == ["do x", "do y", "do z"]


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        ("", "empty.txt", "no instructions found (empty prompt set)"),
        ("\n \n", "blank.txt", "no instructions found"),
        (None, "missing.txt", "prompt file not found"),
        ('[{"a": 1, "b": 2}]', "cols.json", "no column"),
        ("{not json", "bad.jsonl", "cannot read prompts"),
        ("x", "p.xlsx", "unsupported prompt file type"),
    ],
)
def test_bad_prompt_files(tmp_path, content, name, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(RefusalEditError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_prompts(str(path))


def test_unlabelled_sets_split_by_stable_hash(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("\n".join(f"instruction number {i}" for i in range(200)))
    ps = load_prompts(str(path))
    parts = [ps.split(s) for s in ("train", "val", "test")]
    assert sum(len(p) for p in parts) == 200
    assert 100 < len(parts[0]) < 180
    assert ps.split("val").instructions == load_prompts(str(path)).split("val").instructions


def test_post_instruction_positions_come_from_the_template():
    fmt = chat_format(tokenizer())
    assert fmt.position_labels() == ["<|end|>", "<|assistant|>"]
    text = fmt.format("hello")
    assert text == "<s><|system|>you are a tiny test model.<|end|><|user|>hello<|end|><|assistant|>"
    assert fmt.describe()["system_prompt"] == "(model default)"


def test_system_prompt_replaces_the_default():
    fmt = chat_format(tokenizer(), system="be brief")
    assert fmt.format("hi") == "<s><|system|>be brief<|end|><|user|>hi<|end|><|assistant|>"
    assert fmt.describe()["system_prompt"] == "be brief"


def test_no_chat_template_is_an_error_unless_a_template_file_is_given(tmp_path):
    tok = tokenizer(chat_template=None)
    with pytest.raises(RefusalEditError, match="no chat template; pass --template FILE"):
        chat_format(tok)
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}q: {{ m['content'] }}{% endfor %} a:")
    fmt = chat_format(tok, template_file=path)
    assert fmt.format("x") == "q: x a:"
    assert fmt.position_labels() == [" ", "a", ":"]
    assert fmt.describe()["template"] == "file:t.jinja"
