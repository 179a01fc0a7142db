"""GGUF in, GGUF out as a workflow: resolve MODEL (a .gguf file or a recipe) and the edit, plan it on the file
(`GGUFSource`), build the record (`build_record`, as the safetensors path) and write the GGUF (`gguf.edit`).

`refusal_edit.workflows.orthogonalize` (`workflows.editing`) routes an `out` ending in `.gguf` here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import refusal_edit.workflows.defaults as defaults
from refusal_edit.edits.plan import EditPlan
from refusal_edit.edits.spec import EditSpec
from refusal_edit.gguf.edit import RECORD_KEY, GGUFWriteResult, previous_record, summary, write_gguf
from refusal_edit.gguf.hf_view import GGUFSource
from refusal_edit.gguf.lora import write_gguf_lora
from refusal_edit.gguf.metadata import default_name
from refusal_edit.loading.gguf import gguf_model
from refusal_edit.workflows.planning import build_record, edit_inputs, plan_on, target_identity

UNKNOWN_BASE = (
    "the base model is unknown (a local file): the record names none; pass `base_model` ORG/NAME to name it "
    "(here, or to push)"
)


@dataclass
class GGUFEditResult:
    write: GGUFWriteResult
    plan: EditPlan
    record: Any  # EditRecord, with the requantization figures
    warnings: list[str] = field(default_factory=list)


def orthogonalize_gguf(
    model: str | Path,
    direction: Any,
    out: str | Path | None,
    edit: EditSpec | str | Path | None = None,
    *,
    keep_tied: bool = False,
    force: bool = False,
    replace_any: bool = False,
    base_model: str | None = None,
    name: str | None = None,
    allow_foreign_direction: bool = False,
    format: str = "gguf",
) -> GGUFEditResult:
    """Edit a GGUF file (a `.gguf` path or a recipe) by a direction file (or `DirectionFile`) as `edit` says
    (an `EditSpec`, default: the paper's ablation; or a tune front point), and write the edited GGUF to `out`.

    The same plan as the safetensors path (`planning.plan_on` on a `GGUFSource`) and the
    same record (`build_record`), embedded as `refusal_edit.record` plus flat `refusal_edit.*` keys.
    `format` `gguf-lora` writes a llama.cpp LoRA adapter for the file instead of the edited file. Without
    `out`: `runs/<model>/` + ggml's file name for the edit (`gguf.metadata.default_name`).
    """
    d, edit, spec_info = edit_inputs(direction, edit)
    model_source = gguf_model(model)
    assert model_source.origin is not None
    source = GGUFSource(model_source.origin)
    previous = previous_record(source)
    target = target_identity(source.config, model_source.name, model_source.sha256, previous is not None)
    plan, at = plan_on(source, d, edit, keep_tied, target, allow_foreign_direction)
    if out is None:
        removes = edit.mode == "ablate" or edit.coeff < 0
        out = defaults.default_out(model_source, default_name(source.gguf, removes, lora=format == "gguf-lora"))
    record = build_record(
        plan,
        d,
        Path(out),
        base_model=defaults.base_model(model_source, base_model),
        source_model={"path": str(source.path), "name": source.path.name},
        previous=previous,
        edit=edit,
        at=at,
        name=name,
        format=format,
        spec_info=spec_info,
        license=source.gguf.value("general.license"),
    )
    inputs = tuple(p for p in (d.path,) if p is not None)
    if format == "gguf-lora":
        lora = write_gguf_lora(
            source, plan, Path(out), record=record.to_dict(), force=force, replace_any=replace_any, inputs=inputs
        )
        plan.notes.extend(lora.notes)
        warnings = [] if record.base_model else [UNKNOWN_BASE]
        return GGUFEditResult(lora, plan, record, warnings)  # type: ignore[arg-type]
    result = write_gguf(
        source, plan, Path(out), record=record.to_dict(), force=force, replace_any=replace_any, inputs=inputs
    )
    final = type(record).from_dict(result.record, RECORD_KEY)
    plan.notes.extend(summary(result.tensors))  # requantization figures, shown with the plan's notes
    warnings = list(result.notes)  # type fallbacks, one per tensor
    if final.base_model is None:
        warnings.append(UNKNOWN_BASE)
    return GGUFEditResult(result, plan, final, warnings)
