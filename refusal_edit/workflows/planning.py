"""What every edit workflow shares, whatever the output (a checkpoint, a GGUF file, an adapter) or the hooks of
`chat` and `evaluate`: the one edit value the options describe (`edit_from_options`: an `EditSpec`, or a tune
front point), the direction and the spec it resolves to (`edit_inputs`), what the spec draws on in the
direction file (`intervention_of`: the hooks, and what the planner applies), its plan on any tensor source
(`plan_on`), the identity it is planned on, and its record (`build_record`), saved with its card
(`save_record`).

Both `workflows.editing` and `workflows.gguf` build on it; neither imports the other's internals.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import refusal_edit.workflows.defaults as defaults
from refusal_edit.checkpoint.card import render_card
from refusal_edit.checkpoint.record import EditRecord
from refusal_edit.directions import identity
from refusal_edit.directions.artifacts import DirectionFile, load_direction
from refusal_edit.directions.bank import load_bank
from refusal_edit.edits.plan import EditPlan, plan_addition, plan_edit, resolved_config
from refusal_edit.edits.spec import EditSpec, describe_variant, variant
from refusal_edit.errors import RefusalEditError
from refusal_edit.interventions import Intervention
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
    spec_info: dict[str, Any] | None = None,
    license: str | None = None,
) -> EditRecord:
    """What was done, for the record and the model card, whatever the output format; a re-edit carries
    `previous` (the input's own record), and with it the original base model (`EditRecord.after`).
    `edit` is the edit (`at`: the layer an addition went to); a variant or a tune front point (`spec_info`:
    what the record keeps of the front, `edit_inputs`) is recorded as mode ablate with its spec."""
    edit = edit or EditSpec()
    mode = edit.mode
    spec = None if spec_info is None else {"edit": edit.to_json(), **spec_info}
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
    direction: DirectionFile | str | Path | None, edit: EditSpec | str | Path | None
) -> tuple[DirectionFile, EditSpec, dict[str, Any] | None]:
    """The direction file, the edit and what the record keeps of a variant (None: the plain edit of a direction
    file), whatever the edit is written to: a tune front point (`front.json[#ID]`) names its direction (and
    must be given that one), an `EditSpec` (default: the paper's ablation) uses `direction`."""
    spec_info: dict[str, Any] | None = None
    if isinstance(edit, str | Path):
        edit, tuned_with, spec_info = front_point(defaults.expand(str(edit)))
        direction = direction if direction is not None else tuned_with
    else:
        edit = (edit or EditSpec()).check()
        spec_info = {} if edit.is_variant else None
    if direction is None:
        raise RefusalEditError("give `direction` (a direction file) or `spec` (a tune front point)")
    d = direction if isinstance(direction, DirectionFile) else load_direction(defaults.expand(str(direction)))
    if spec_info and spec_info.get("direction_sha256") not in (None, d.sha256):
        raise RefusalEditError(f"{d.path} is not the direction file the front was tuned with (its sha256 differs)")
    return d, edit, spec_info


def intervention_of(d: DirectionFile, edit: EditSpec) -> Intervention:
    """What `edit` draws on in the direction file `d`: the vector an addition adds and the layer it goes to (the
    direction's own unless `edit.layer` says otherwise), the unit direction an ablation removes, and for an
    ablation variant every candidate saved beside it. The hooks apply it; `plan_on` writes the same edit."""
    edit = edit.check()
    if edit.mode == "add":
        vector, at = d.edit_vector(edit)
        return Intervention(replace(edit, layer=at), vector)
    return Intervention(edit, d.direction, load_bank(d)[0] if edit.is_variant else None)


def plan_on(
    source: Any,
    d: DirectionFile,
    edit: EditSpec,
    keep_tied: bool,
    target: dict[str, Any] | None = None,
    allow_foreign_direction: bool = False,
) -> tuple[EditPlan, int | None]:
    """The plan of `edit` on any tensor source (a checkpoint, a GGUF file), and the layer an addition is at.

    `target` is the edited model's identity (`directions.identity`, with `edited` when it carries an edit
    record): a direction from another model is an error unless `allow_foreign_direction`; what was decided
    about it goes into the plan's notes (and so into the record and the card)."""
    note = None
    if target is not None:
        edited = bool(target.pop("edited", False))
        what = f"the direction {d.path.name if d.path else ''}".rstrip()
        note = identity.check(d.source_model, target, what, edited=edited, allow=allow_foreign_direction)
    hooks = intervention_of(d, edit)
    spec = hooks.spec
    if spec.mode == "add":
        assert spec.layer is not None
        vector, site = spec.coeff * hooks.vector, spec.site or "input"
        plan = plan_addition(source, vector, spec.layer, site=site, keep_tied=keep_tied)
    else:
        plan = plan_edit(source, hooks.bases(int(resolved_config(source).num_hidden_layers)), keep_tied=keep_tied)
    if note:
        plan.notes.append(note)
    return plan, spec.layer


def target_identity(config: dict[str, Any], name: str, weights_sha256: str | None, edited: bool) -> dict[str, Any]:
    """The identity of the model an edit is planned on, marked `edited` when it carries an edit record."""
    return {**identity.identity(config, name, weights_sha256), "edited": edited}


def edit_from_options(
    spec: str | Path | None = None,
    *,
    mode: str = "ablate",
    coeff: float = 1.0,
    layer: int | None = None,
    site: str | None = None,
    unit: bool = False,
    layers: str | None = None,
    weight: float | None = None,
    per_layer: bool = False,
    projected: bool = False,
    rank: int = 1,
    basis: str = "positions",
    preserve_norm: bool = False,
) -> EditSpec | str | Path:
    """The one edit value the options describe: the tune front point `spec` as given (it names its
    direction; read by `edit_inputs`), else the `EditSpec` of the variant options (an ablation), else of
    `mode` with `coeff`, `layer`, `site` and `unit`."""
    options = variant(layers, weight, "layer" if per_layer else None, projected, rank, basis, preserve_norm)
    if spec is not None and options is not None:
        raise RefusalEditError("`spec` already describes the edit: drop the variant options")
    edit = EditSpec(mode=mode, coeff=coeff, layer=layer, site=site, unit=unit)
    if spec is None and options is None:
        return edit  # checked where it is used (a chat without `direction` says so first)
    if edit.check().mode != "ablate":
        raise RefusalEditError("`spec` describes an ablation variant; it does not combine with `mode` add")
    return spec if spec is not None else options
