"""The model card (README.md) of an edited checkpoint, rendered from its `refusal_edit.json` record.

The card states plainly what the edit does to the model's safety behaviour; its YAML metadata is what
the Hub indexes (`base_model`, `base_model_relation`, tags).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from refusal_edit.errors import RefusalEditError

RECORD = "refusal_edit.json"


def read_record(folder: str | Path, required: bool = False) -> dict[str, Any] | None:
    """The edit record of a checkpoint folder; None when absent (a clear error when required or corrupt)."""
    path = Path(folder) / RECORD
    if not path.is_file():
        if required:
            raise RefusalEditError(f"{folder} has no {RECORD} (the record written by refusal-edit orthogonalize)")
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RefusalEditError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(record, dict):
        raise RefusalEditError(f"{path} must hold a JSON object")
    return record


def card_metadata(record: dict[str, Any]) -> dict[str, Any]:
    abliterated = record.get("mode") == "ablate" or float(record.get("coeff", 1.0)) < 0
    return {
        "base_model": record.get("base_model") or record.get("source_model", {}).get("name", "unknown"),
        "base_model_relation": "finetune",
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["refusal-edit", "abliterated" if abliterated else "refusal-amplified"],
    }


def _effect(record: dict[str, Any]) -> str:
    mode = record.get("mode")
    coeff = float(record.get("coeff", 1.0))
    if mode == "ablate":
        return (
            "**Safety warning.** The refusal direction was removed from every matrix that writes into the "
            "residual stream. This model is designed to stop refusing: it will follow harmful requests that "
            "the base model declines. Its other behaviour is close to, but not exactly, the base model's."
        )
    if coeff < 0:
        return (
            f"**Safety warning.** {-coeff:g} x the refusal vector is subtracted from the residual stream at "
            f"layer {record.get('layer')}. This suppresses refusals: the model will follow harmful requests "
            "that the base model declines."
        )
    return (
        f"{coeff:g} x the refusal vector is added to the residual stream at layer {record.get('layer')}. This "
        "amplifies refusal: the model refuses more, including many harmless requests."
    )


def render_card(record: dict[str, Any]) -> str:
    meta = yaml.safe_dump(card_metadata(record), sort_keys=False).strip()
    evaluation = record.get("evaluation")
    lines = [
        "---",
        meta,
        "---",
        "",
        f"# {record.get('name') or 'Refusal-edited model'}",
        "",
        f"Edited from `{card_metadata(record)['base_model']}` with "
        f"[refusal-edit](https://github.com/refusal-edit/refusal-edit) {record.get('tool_version', '')}.",
        "",
        _effect(record),
        "",
        "Intended for interpretability and safety research (e.g. studying how refusal is represented). "
        "Do not deploy it where its outputs can cause harm.",
        "",
        "## What was done",
        "",
        f"- mode: `{record.get('mode')}`"
        + (f", coefficient {record.get('coeff')}" if record.get("mode") == "add" else ""),
        f"- direction: layer {record.get('direction_layer')}, position {record.get('direction_position')}, "
        f"sha256 `{str(record.get('direction_sha256', ''))[:16]}...`",
    ]
    for note in record.get("notes", []):
        lines.append(f"- {note}")
    if evaluation:
        lines += ["", "## Measured", ""]
        for key, value in evaluation.items():
            lines.append(f"- {key}: {value}")
    else:
        lines += ["", "No evaluation has been recorded for this checkpoint (`refusal-edit evaluate` measures it)."]
    lines += ["", "The full record of the edit is in `refusal_edit.json`.", ""]
    return "\n".join(lines)
