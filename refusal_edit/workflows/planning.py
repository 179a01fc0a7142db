"""What every edit workflow shares, whatever the output (a checkpoint, a GGUF file, an adapter) or the hooks of
`chat`: the direction and the variant of an edit (`edit_inputs`), its plan on any tensor source (`plan_on`),
the identity it is planned on, and its record (`build_record`), saved with its card (`save_record`).

Both `workflows.editing` and `workflows.gguf` build on it; neither imports the other's internals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import refusal_edit.workflows.defaults as defaults
from refusal_edit.checkpoint.card import render_card
from refusal_edit.checkpoint.layout import Checkpoint
from refusal_edit.checkpoint.record import EditRecord
from refusal_edit.directions import identity
from refusal_edit.directions.artifacts import DirectionFile, load_direction
from refusal_edit.directions.bank import load_bank
from refusal_edit.edits import plan_direction_edit
from refusal_edit.edits.plan import EditPlan, plan_edit, resolved_config
from refusal_edit.edits.spec import EditSpec, describe_variant, resolve, variant
from refusal_edit.errors import RefusalEditError
from refusal_edit.workflows.tune import load_front_point


def build_record(
    plan: EditPlan,
    direction: DirectionFile,
    out: Path,
    *,
    base_model: str | None,
    source_model: dict[str, Any],
    previous: EditRecord | None = None,
    edit: EditSpec | None = None,
    at: int | None = None,
    dtype: str = "keep",
    name: str | None = None,
    format: str = "safetensors",
    spec: dict[str, Any] | None = None,
    license: str | None = None,
) -> EditRecord:
    """What was done, for the record and the model card, whatever the output format; a re-edit carries
    `previous` (the input's own record), and with it the original base model (`EditRecord.after`).
    `edit` is the direction's edit (`at`: the layer an addition went to); a variant (`spec`, an ablation) is
    recorded as mode ablate with its spec."""
    edit = edit or EditSpec()
    mode = edit.mode
    return EditRecord(
        mode=mode,
        base_model=base_model,
        coeff=edit.coeff,
        layer=at if mode == "add" else None,
        site=(edit.site or "input") if mode == "add" else None,
        unit=edit.unit,
        direction_file=direction.path.name if direction.path else None,
        direction_sha256=direction.sha256 or None,
        direction_layer=direction.layer,
        direction_position=direction.position,
        direction_model=direction.metadata.get("model"),
        format=format,
        name=name or Path(out).name,
        source_model={**source_model, "model_type": plan.spec.model_type},
        output_dtype=dtype,
        edited_tensors=dict(plan.counts),
        notes=[n for n in plan.notes if n],
        spec=spec,
        license=license or (previous.license if previous is not None else None),
    ).after(previous)


def save_record(record: EditRecord, folder: Path) -> Path:
    """Write the record and the model card rendered from it (the variant in words) into `folder`."""
    return record.save(folder, card=render_card(record, describe_variant(record.spec)))


def plan_variant(ckpt: Checkpoint, direction: DirectionFile, spec: EditSpec, keep_tied: bool = False) -> EditPlan:
    """The plan of an edit variant (`EditSpec`): its bases and weights resolved against the direction's bank."""
    bank, _ = load_bank(direction)
    n_layers = int(resolved_config(ckpt).num_hidden_layers)
    return plan_edit(ckpt, resolve(spec, bank, n_layers), keep_tied=keep_tied)


def front_point(spec: str | Path) -> tuple[EditSpec, Path, dict[str, Any]]:
    """A confirmed point of a tune front (`front.json[#ID]`): its spec, the direction it draws on, and what
    the record keeps of it (front file, point id, the numbers confirmed for it)."""
    data, point = load_front_point(spec)
    direction = (data.get("direction") or {}).get("path")
    if not direction:
        raise RefusalEditError(f"{spec} does not name the direction file it was tuned with")
    info = {
        "front": str(Path(str(spec).partition("#")[0]).expanduser()),
        "point": point.get("id"),
        "confirmed": point.get("confirmed"),
        "direction_sha256": (data.get("direction") or {}).get("sha256"),
        "chat_format": {k: (data.get("chat_format") or {}).get(k) for k in ("template", "system_prompt")},
    }
    return EditSpec.from_json(point.get("spec")), Path(direction), info


def edit_inputs(
    direction: DirectionFile | str | Path | None, spec: EditSpec | str | Path | None, edit: EditSpec
) -> tuple[DirectionFile, EditSpec | None, dict[str, Any] | None]:
    """The direction file and the variant of an edit, whatever it is written to: a tune front point names its
    direction (and must be given that one), an `EditSpec` or none uses `direction`."""
    spec_info: dict[str, Any] | None = None
    edit.check()
    if spec is not None:
        if edit.mode != "ablate":
            raise RefusalEditError("`spec` describes an ablation variant; it does not combine with `mode` add")
        if not isinstance(spec, EditSpec):
            spec, tuned_with, spec_info = front_point(defaults.expand(str(spec)))
            direction = direction if direction is not None else tuned_with
        else:
            spec_info = {}
    if direction is None:
        raise RefusalEditError("give `direction` (a direction file) or `spec` (a tune front point)")
    d = direction if isinstance(direction, DirectionFile) else load_direction(defaults.expand(str(direction)))
    if spec_info and spec_info.get("direction_sha256") not in (None, d.sha256):
        raise RefusalEditError(f"{d.path} is not the direction file the front was tuned with (its sha256 differs)")
    return d, spec, spec_info


def plan_on(
    source: Any,
    d: DirectionFile,
    spec: EditSpec | None,
    edit: EditSpec,
    keep_tied: bool,
    target: dict[str, Any] | None = None,
    allow_foreign_direction: bool = False,
) -> tuple[EditPlan, int | None]:
    """The plan on any tensor source (a checkpoint, a GGUF file), and the layer an addition is at.

    `target` is the edited model's identity (`directions.identity`, with `edited` when it carries an edit
    record): a direction from another model is an error unless `allow_foreign_direction`; what was decided
    about it goes into the plan's notes (and so into the record and the card)."""
    note = None
    if target is not None:
        edited = bool(target.pop("edited", False))
        what = f"the direction {d.path.name if d.path else ''}".rstrip()
        note = identity.check(d.source_model, target, what, edited=edited, allow=allow_foreign_direction)
    if spec is not None:
        plan, at = plan_variant(source, d, spec, keep_tied), None
    else:
        plan, at = plan_direction_edit(source, d, edit, keep_tied)
    if note:
        plan.notes.append(note)
    return plan, at


def target_identity(config: dict[str, Any], name: str, weights_sha256: str | None, edited: bool) -> dict[str, Any]:
    """The identity of the model an edit is planned on, marked `edited` when it carries an edit record."""
    return {**identity.identity(config, name, weights_sha256), "edited": edited}


def edit_variant(
    spec: str | None,
    layers: str | None,
    weight: float | None,
    per_layer: bool,
    projected: bool,
    rank: int,
    basis: str,
    preserve_norm: bool,
) -> EditSpec | str | None:
    """The edit variant the options describe: the `spec` front point as given, else an `EditSpec` from the
    variant options, else None (the paper's plain edit). Both at once is an error."""
    options = variant(layers, weight, "layer" if per_layer else None, projected, rank, basis, preserve_norm)
    if spec is not None and options is not None:
        raise RefusalEditError("`spec` already describes the edit: drop the variant options")
    return spec if spec is not None else options
