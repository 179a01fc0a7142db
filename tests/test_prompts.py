"""Prompt sets (built-in and users' files) and chat formatting."""

from __future__ import annotations

import json
import os

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
        ("fifo", "pipe.txt", "prompt file is not a regular file"),  # reading it would wait forever
        ("dir", "folder.txt", "prompt file is a directory, not a file"),
    ],
)
def test_bad_prompt_files(tmp_path, content, name, message):
    path = tmp_path / name
    if content == "fifo":
        os.mkfifo(path)
    elif content == "dir":
        path.mkdir()
    elif content is not None:
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
    with pytest.raises(RefusalEditError, match="no chat template; pass `template_file` FILE"):
        chat_format(tok)
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}q: {{ m['content'] }}{% endfor %} a:")
    fmt = chat_format(tok, template_file=path)
    assert fmt.format("x") == "q: x a:"
    assert fmt.position_labels() == [" ", "a", ":"]
    assert fmt.describe()["template"] == "file:t.jinja"


def test_builtin_borderline_set():
    ps = builtin("borderline")
    assert len(ps) == 160 and len(set(ps.instructions)) == 160
    assert len(set(ps.categories)) == 10 and all(ps.categories.count(c) == 16 for c in set(ps.categories))
    assert [len(ps.split(s)) for s in ("train", "val", "test")] == [60, 20, 80]
    assert load_prompts("builtin:borderline@test").instructions == ps.split("test").instructions
    others = set(builtin("harmful").instructions) | set(builtin("harmless").instructions)
    assert not set(ps.instructions) & others
    with pytest.raises(RefusalEditError, match="harmful, harmless, borderline"):
        builtin("nope")


@pytest.mark.parametrize("suffix", ["txt", "json", "jsonl", "csv"])
def test_a_byte_order_mark_is_dropped(tmp_path, suffix):
    content = {
        "txt": "first thing\nsecond thing\n",
        "json": json.dumps([{"prompt": "first thing"}, {"prompt": "second thing"}]),
        "jsonl": '{"prompt": "first thing"}\n{"prompt": "second thing"}\n',
        "csv": "prompt,category\nfirst thing,a\nsecond thing,b\n",
    }[suffix]
    path = tmp_path / f"p.{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + content.encode())
    ps = load_prompts(str(path))
    assert ps.instructions == ["first thing", "second thing"]
    if suffix == "csv":
        assert ps.categories == ["a", "b"]  # the BOM did not hide the first column's name
    assert load_prompts(f"{path}#prompt" if suffix != "txt" else str(path)).instructions[0] == "first thing"


THINKING_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>"
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}{% endif %}"
)


def test_template_kwargs_pass_through_and_are_recorded():
    tok = tokenizer(chat_template=THINKING_TEMPLATE)
    assert chat_format(tok).format("hi") == "<|user|>hi<|end|><|assistant|>"
    fmt = chat_format(tok, template_kwargs={"enable_thinking": False})
    assert fmt.format("hi") == "<|user|>hi<|end|><|assistant|><think></think>"
    assert fmt.describe()["template_kwargs"] == {"enable_thinking": False}
    # The post-instruction tokens include the empty reasoning block (one token per character here).
    assert len(fmt.post_ids) == len(chat_format(tok).post_ids) + len("<think></think>")
    assert chat_format(tok).describe()["template_kwargs"] == {}


def test_parse_template_kwargs():
    from refusal_edit.prompts.template import parse_template_kwargs

    got = parse_template_kwargs(["enable_thinking=false", "reasoning_effort=low,n=3", "x=[1, 2]", "y=None"])
    assert got == {"enable_thinking": False, "reasoning_effort": "low", "n": 3, "x": [1, 2], "y": None}
    assert parse_template_kwargs(None) == {} and parse_template_kwargs({"a": 1}) == {"a": 1}
    with pytest.raises(RefusalEditError, match="expected NAME=VALUE"):
        parse_template_kwargs(["enable_thinking"])
    with pytest.raises(RefusalEditError, match="not a valid name"):
        parse_template_kwargs(["bad-name=1"])
    with pytest.raises(RefusalEditError, match="set by refusal-edit itself"):
        parse_template_kwargs(["add_generation_prompt=false"])


def test_template_file_is_read_like_every_user_file(tmp_path):
    """`~` expanded, a BOM dropped, a missing or undecodable file one clear line (`paths.read_text`)."""
    tok = tokenizer(chat_template=None)
    with pytest.raises(RefusalEditError, match=r"^template file not found: .*none\.jinja$"):
        chat_format(tok, template_file=tmp_path / "none.jinja")
    os.mkfifo(tmp_path / "pipe.jinja")
    with pytest.raises(RefusalEditError, match=r"^template file is not a regular file: .*pipe\.jinja$"):
        chat_format(tok, template_file=tmp_path / "pipe.jinja")
    bad = tmp_path / "bad.jinja"
    bad.write_bytes(b"\xff\xfe{{ x }}")
    with pytest.raises(RefusalEditError, match=r"^cannot read the template file .*bad\.jinja: 'utf-8' codec"):
        chat_format(tok, template_file=bad)
    bom = tmp_path / "bom.jinja"
    bom.write_bytes("\ufeff{% for m in messages %}q: {{ m['content'] }}{% endfor %} a:".encode())
    assert chat_format(tok, template_file=bom).format("x") == "q: x a:"
