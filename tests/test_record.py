"""The edit record (`refusal_edit.json`): validation, files, re-edits, evaluation, and the card rendered from it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from refusal_edit.checkpoint.card import CARD, card_metadata, render_card, validate_card
from refusal_edit.checkpoint.record import RECORD, EditRecord, is_tool_output
from refusal_edit.errors import RefusalEditError

SHA = "ab" * 32


def record(**kw) -> EditRecord:
    fields = {"mode": "ablate", "base_model": "org/base", "direction_sha256": SHA, "name": "tiny-abliterated"}
    return EditRecord(**(fields | kw))


def write(folder: Path, data) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / RECORD).write_text(data if isinstance(data, str) else json.dumps(data))
    return folder


def test_round_trip_keeps_every_field_and_unknown_keys(tmp_path):
    r = record(spec={"attn": {"peak": 3}}, mode="ablate", format="gguf", template={"system_prompt": "hi"})
    r.extra["future_key"] = [1, 2]
    r.save(tmp_path)  # no card text given: the record alone
    loaded = EditRecord.load(tmp_path)
    assert loaded == r
    assert json.loads((tmp_path / RECORD).read_text())["future_key"] == [1, 2]
    assert not (tmp_path / CARD).exists()
    assert EditRecord.from_json(r.to_json()) == r


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "lacks tool, tool_version, mode, base_model"),
        ([], "must hold a JSON object, not list"),
        ({"tool": "refusal-edit", "tool_version": "1", "mode": "ablate"}, "lacks base_model"),
        ({"tool": "other", "tool_version": "1", "mode": "ablate", "base_model": None}, "tool must be 'refusal-edit'"),
        ({"tool": "refusal-edit", "tool_version": "1", "mode": "melt", "base_model": None}, "mode must be one of"),
    ],
)
def test_incomplete_or_foreign_records_are_refused(tmp_path, data, message):
    write(tmp_path, data)
    with pytest.raises(RefusalEditError, match=message):
        EditRecord.load(tmp_path)
    assert not is_tool_output(tmp_path)


@pytest.mark.parametrize("base", ["model", "/home/me/models/base", "./org/name", "a/b/c", "org/na me", "", 7])
def test_base_model_must_be_a_hub_id_or_null(base):
    with pytest.raises(RefusalEditError, match="base_model must be"):
        record(base_model=base).validate()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mode": "add", "layer": None}, "layer must be set for mode add"),
        ({"mode": "spec"}, "mode must be one of ablate, add"),
        ({"format": "onnx"}, "format must be one of safetensors, gguf"),
        ({"coeff": math.nan}, "coeff must be finite"),
        ({"coeff": "1"}, "coeff must be a number"),
        ({"layer": True}, "layer must be an integer or null"),
        ({"direction_sha256": "xyz"}, "direction_sha256 must be 64 lowercase hex digits"),
        ({"edited_tensors": {"linear": "6"}}, "edited_tensors must map names to counts"),
        ({"notes": ["ok", 3]}, "notes must be a list of strings"),
        ({"evaluation": [0.1]}, "evaluation must be an object or null"),
    ],
)
def test_field_checks_name_the_field(change, message):
    with pytest.raises(RefusalEditError, match=message):
        record(**change).validate()


def test_valid_variants():
    assert record(base_model=None).validate().base_model is None
    assert record(mode="add", coeff=-1, layer=2, site="input").validate().removes_refusal
    assert not record(mode="add", coeff=2.5, layer=2).removes_refusal
    assert record(mode="ablate", spec={"rank": 2}).removes_refusal


@pytest.mark.parametrize(
    ("text", "message"),
    [("{not json", "is not valid JSON"), ('{"coeff": NaN}', "NaN is not JSON"), ("\xff\xfe", "is not valid JSON")],
)
def test_corrupt_files(tmp_path, text, message):
    (tmp_path / RECORD).write_bytes(text.encode("latin-1"))
    with pytest.raises(RefusalEditError, match=message):
        EditRecord.load(tmp_path)


def test_missing_record(tmp_path):
    assert EditRecord.load(tmp_path) is None
    with pytest.raises(RefusalEditError, match=f"has no {RECORD}"):
        EditRecord.load(tmp_path, required=True)
    assert not is_tool_output(tmp_path) and not is_tool_output(tmp_path / "nowhere")


def test_is_tool_output(tmp_path):
    (tmp_path / "out").mkdir()
    record().save(tmp_path / "out")
    assert is_tool_output(tmp_path / "out")
    assert not is_tool_output(tmp_path / "out" / RECORD)  # a file is not an output folder


def test_re_edit_carries_the_original_base_model():
    first = record(base_model="org/base")
    second = record(base_model=None, name="second").after(first)
    assert second.base_model == "org/base"
    assert second.previous_edit == first.to_dict()
    third = record(base_model=None).after(second)
    assert third.base_model == "org/base" and third.previous_edit["previous_edit"] == first.to_dict()
    assert record(base_model="org/other").after(first).base_model == "org/other"  # explicit wins
    assert record(base_model=None).after(None).previous_edit is None


def test_save_is_atomic_and_refuses_invalid_records(tmp_path):
    good = record()
    good.save(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(RefusalEditError, match="base_model must be"):
        record(base_model="local-folder").save(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing half-written


def test_evaluation_summary_goes_into_record_and_card(tmp_path):
    from refusal_edit.workflows.planning import save_record

    save_record(record(), tmp_path)
    summary = {"harmful_refusal_edited": 0.02, "first_token_kl": math.inf, "ce_edited": 1.5}
    save_record(EditRecord.load(tmp_path, required=True).with_evaluation(summary), tmp_path)
    again = EditRecord.load(tmp_path)
    assert again.evaluation == {"harmful_refusal_edited": 0.02, "first_token_kl": None, "ce_edited": 1.5}
    card = (tmp_path / CARD).read_text()
    assert "## Measured" in card and "- harmful_refusal_edited: 0.02" in card
    assert sorted(p.name for p in tmp_path.iterdir()) == [CARD, RECORD]


def test_card_states_the_edit_and_its_metadata():
    meta = card_metadata(record())
    assert meta == {
        "base_model": "org/base",
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["refusal-edit", "abliterated", "uncensored"],
        "base_model_relation": "finetune",
    }
    card = render_card(record(mode="add", coeff=2.0, layer=3))
    assert yaml.safe_load(card.split("---")[1])["tags"] == ["refusal-edit", "refusal-amplified"]
    assert "2 x the refusal vector is added to the residual stream at layer 3" in card
    assert "will follow harmful requests" in render_card(record(mode="add", coeff=-1.0, layer=3))
    assert '- spec: `{"rank": 2}`' in render_card(record(mode="ablate", spec={"edit": {"rank": 2}}))
    assert validate_card(render_card(record()), record())["base_model"] == "org/base"


def test_unknown_base_model_gives_no_base_model_in_the_card():
    unknown = record(base_model=None)
    card = render_card(unknown)
    assert "base_model" not in yaml.safe_load(card.split("---")[1])
    assert "Edited from a base model that was not recorded" in card
    with pytest.raises(RefusalEditError, match="metadata lacks base_model"):
        validate_card(card, unknown)


def test_a_variant_record_of_an_older_version_reads_as_an_ablation(tmp_path):
    """Versions before issue #30 recorded a variant as the pseudo-mode `spec`: such a record still reads (mode
    ablate, its spec kept) and its card still says the spec decides which matrices; without a spec it is an
    error naming the field."""
    old = record().to_dict() | {"mode": "spec", "spec": {"edit": {"rank": 2}}}
    loaded = EditRecord.load(write(tmp_path / "old", old))
    assert loaded is not None and loaded.mode == "ablate" and loaded.spec == {"edit": {"rank": 2}}
    assert "as the spec below describes" in render_card(loaded)
    assert json.loads(loaded.to_json())["mode"] == "ablate"
    with pytest.raises(RefusalEditError, match="spec must describe the edit for mode spec"):
        EditRecord.load(write(tmp_path / "bad", old | {"spec": None}))
