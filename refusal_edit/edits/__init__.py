"""Permanent weight edits: orthogonalization (ablate) and baked activation addition (add)."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from refusal_edit import __version__
from refusal_edit.checkpoint.card import RECORD, read_record, render_card
from refusal_edit.checkpoint.layout import open_checkpoint
from refusal_edit.directions.artifacts import DirectionFile
from refusal_edit.edits.plan import EditPlan, plan_ablation, plan_addition
from refusal_edit.edits.write import WriteResult, write_checkpoint
from refusal_edit.errors import RefusalEditError

__all__ = ["EditResult", "orthogonalize", "parse_size"]


@dataclass
class EditResult:
    write: WriteResult
    plan: EditPlan
    record: dict[str, Any]


def parse_size(text: str | None) -> int | None:
    """'5GB' / '500MB' / '1.5GiB' / '1024' -> bytes (decimal units as in transformers)."""
    if text is None:
        return None
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    t = text.strip().upper()
    for unit, factor in units.items():
        if t.endswith(unit):
            try:
                return int(float(t[: -len(unit)]) * factor)
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise RefusalEditError(f"cannot read size {text!r} (e.g. 5GB, 500MB)") from None


def orthogonalize(
    model_dir: Path,
    direction: DirectionFile,
    out: Path,
    mode: Literal["ablate", "add"] = "ablate",
    coeff: float = 1.0,
    layer: int | None = None,
    site: str = "input",
    unit: bool = False,
    dtype: str = "keep",
    max_shard_size: str | None = None,
    force: bool = False,
    keep_tied: bool = False,
    base_model: str | None = None,
    name: str | None = None,
) -> EditResult:
    """Edit the checkpoint in `model_dir` and write a standalone model to `out` (see the CLI help)."""
    ckpt = open_checkpoint(Path(model_dir))
    vector, layer = direction.edit_vector(mode, coeff, layer, unit, "--mode")
    if mode == "ablate":
        plan = plan_ablation(ckpt, vector, keep_tied=keep_tied)
    else:
        plan = plan_addition(ckpt, coeff * vector, layer, site=site, keep_tied=keep_tied)  # type: ignore[arg-type]
    previous = read_record(ckpt.root)
    record: dict[str, Any] = {
        "tool": "refusal-edit",
        "tool_version": __version__,
        "name": name or Path(out).name,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "mode": mode,
        "coeff": coeff,
        "layer": layer if mode == "add" else None,
        "site": site if mode == "add" else None,
        "unit": unit,
        "direction_file": direction.path.name if direction.path else None,
        "direction_sha256": direction.sha256,
        "direction_layer": direction.layer,
        "direction_position": direction.position,
        "direction_model": direction.metadata.get("model"),
        "base_model": base_model or (previous or {}).get("base_model") or ckpt.root.name,
        "source_model": {"path": str(ckpt.root), "name": ckpt.root.name, "model_type": plan.spec.model_type},
        "output_dtype": dtype,
        "edited_tensors": plan.counts,
        "notes": [n for n in plan.notes if n],
        "previous_edit": previous,
        "evaluation": None,
    }

    def extras(tmp: Path) -> None:
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        (tmp / "README.md").write_text(render_card(record))

    result = write_checkpoint(
        ckpt, plan, Path(out), force=force, dtype=dtype, max_shard_bytes=parse_size(max_shard_size), extra_files=extras
    )
    return EditResult(result, plan, record)
