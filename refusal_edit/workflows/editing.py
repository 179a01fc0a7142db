"""The `orthogonalize` workflow: resolve MODEL, plan the edit (core), build the record, write the checkpoint.

The record (`refusal_edit.json`) and the model card rendered from it travel inside the atomic output, so
an edited checkpoint never exists without them. The output format is chosen in one place (`output_format`):
a safetensors directory, an edited GGUF, or an adapter of either (PEFT LoRA, llama.cpp LoRA).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refusal_edit.checkpoint.atomic import check_output
from refusal_edit.checkpoint.layout import Checkpoint, open_checkpoint
from refusal_edit.checkpoint.record import EditRecord
from refusal_edit.directions import identity
from refusal_edit.directions.artifacts import DirectionFile, load_direction
from refusal_edit.edits import DirectionEdit, EditResult, parse_size, plan_direction_edit, write_checkpoint
from refusal_edit.edits.plan import EditPlan, plan_edit, resolved_config
from refusal_edit.edits.spec import EditSpec, resolve
from refusal_edit.errors import RefusalEditError
from refusal_edit.loading.model import ModelSource
from refusal_edit.workflows import sources


@dataclass
class EditOutcome(EditResult):
    """The written checkpoint, its plan and record, and warnings for the user (e.g. an unknown base model)."""

    record: EditRecord | None = None
    warnings: list[str] = field(default_factory=list)


def build_record(
    plan: EditPlan,
    direction: DirectionFile,
    out: Path,
    *,
    base_model: str | None,
    source_model: dict[str, Any],
    previous: EditRecord | None = None,
    edit: DirectionEdit | None = None,
    at: int | None = None,
    dtype: str = "keep",
    name: str | None = None,
    format: str = "safetensors",
    spec: dict[str, Any] | None = None,
    license: str | None = None,
) -> EditRecord:
    """What was done, for the record and the model card, whatever the output format; a re-edit carries
    `previous` (the input's own record), and with it the original base model (`EditRecord.after`).
    `edit` is the direction's edit (`at`: the layer an addition went to); a variant (`spec`) records mode spec."""
    edit = edit or DirectionEdit()
    mode = "spec" if spec is not None else edit.mode
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


OUTPUT_FORMATS = ("safetensors", "gguf", "peft", "gguf-lora")
FILE_FORMATS = ("gguf", "gguf-lora")  # written to OUT.gguf; the others to a directory


def output_format(out: Path | str | None, format: str | None = None) -> str:
    """The output format: the one given, else from `out` (OUT.gguf: an edited GGUF; a directory: safetensors).
    The one place that chooses it; a format that does not fit `out` is an error. Only a GGUF output has a
    default `out` (ggml's file-name convention, `gguf.metadata.default_name`)."""
    if out is None:
        if format not in FILE_FORMATS:
            raise RefusalEditError("give `out` (the output directory), or `plan_only` to see the plan")
        return format
    is_file = Path(out).suffix.lower() == ".gguf"
    if format is None:
        return "gguf" if is_file else "safetensors"
    if format not in OUTPUT_FORMATS:
        raise RefusalEditError(f"unknown `format` {format!r} ({', '.join(OUTPUT_FORMATS)})")
    if (format in FILE_FORMATS) != is_file:
        want = "a file OUT.gguf" if format in FILE_FORMATS else "a directory"
        raise RefusalEditError(f"`format` {format} writes {want}; `out` is {out}")
    return format


def _writer(out: Path) -> Callable[..., EditResult]:
    """How a checkpoint edit is written to `out`."""
    return _write_safetensors


def _write_safetensors(
    ckpt: Checkpoint, plan: EditPlan, record: EditRecord, out: Path, *, max_shard_size, **options: Any
) -> EditResult:
    result = write_checkpoint(
        ckpt,
        plan,
        Path(out),
        max_shard_bytes=parse_size(max_shard_size),
        extra_files=lambda tmp: record.save(tmp),
        **options,
    )
    return EditResult(result, plan)


def plan_variant(ckpt: Checkpoint, direction: DirectionFile, spec: EditSpec, keep_tied: bool = False) -> EditPlan:
    """The plan of an edit variant (`EditSpec`): its bases and weights resolved against the direction's bank."""
    from refusal_edit.directions.bank import load_bank

    bank, _ = load_bank(direction)
    n_layers = int(resolved_config(ckpt).num_hidden_layers)
    return plan_edit(ckpt, resolve(spec, bank, n_layers), keep_tied=keep_tied)


def front_point(spec: str | Path) -> tuple[EditSpec, Path, dict[str, Any]]:
    """A confirmed point of a tune front (`front.json[#ID]`): its spec, the direction it draws on, and what
    the record keeps of it (front file, point id, the numbers confirmed for it)."""
    from refusal_edit.workflows.tune import load_front_point

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


@dataclass
class EditJob:
    """An edit decided but not written: what the record and the writer need."""

    source: ModelSource
    ckpt: Checkpoint
    direction: DirectionFile
    plan: EditPlan
    layer: int | None  # where an addition goes
    spec: EditSpec | None
    spec_info: dict[str, Any] | None
    inputs: list[Path]
    direction_mode: str = "ablate"  # the direction edit's mode; a variant (`spec`) is mode spec

    @property
    def mode(self) -> str:
        return "spec" if self.spec is not None else self.direction_mode

    def record_spec(self) -> dict[str, Any] | None:
        return None if self.spec is None else {"edit": self.spec.to_json(), **(self.spec_info or {})}


def edit_inputs(
    direction: DirectionFile | str | Path | None, spec: EditSpec | str | Path | None, edit: DirectionEdit
) -> tuple[DirectionFile, EditSpec | None, dict[str, Any] | None]:
    """The direction file and the variant of an edit, whatever it is written to: a tune front point names its
    direction (and must be given that one), an `EditSpec` or none uses `direction`."""
    spec_info: dict[str, Any] | None = None
    edit.check()
    if spec is not None:
        if edit.mode != "ablate":
            raise RefusalEditError("`spec` describes an ablation variant; it does not combine with `mode` add")
        if not isinstance(spec, EditSpec):
            spec, tuned_with, spec_info = front_point(sources.expand(str(spec)))
            direction = direction if direction is not None else tuned_with
        else:
            spec_info = {}
    if direction is None:
        raise RefusalEditError("give `direction` (a direction file) or `spec` (a tune front point)")
    d = direction if isinstance(direction, DirectionFile) else load_direction(sources.expand(str(direction)))
    if spec_info and spec_info.get("direction_sha256") not in (None, d.sha256):
        raise RefusalEditError(f"{d.path} is not the direction file the front was tuned with (its sha256 differs)")
    return d, spec, spec_info


def plan_on(
    source: Any,
    d: DirectionFile,
    spec: EditSpec | None,
    edit: DirectionEdit,
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


def plan_job(
    model: str | Path | ModelSource,
    direction: DirectionFile | str | Path | None,
    edit: DirectionEdit | None = None,
    keep_tied: bool = False,
    spec: EditSpec | str | Path | None = None,
    allow_foreign_direction: bool = False,
) -> EditJob:
    """Resolve MODEL, the direction and the variant, and plan the edit (nothing written: `plan_only` shows it)."""
    edit = edit or DirectionEdit()
    d, spec, spec_info = edit_inputs(direction, spec, edit)
    source = sources.resolve_model(model)
    inputs = [p for p in (d.path, source.origin) if p is not None]
    ckpt = open_checkpoint(source.hf_dir)
    weights = identity.known_weights_sha256(source.hf_dir, source.sha256)
    target = target_identity(ckpt.config, source.name, weights, EditRecord.load(ckpt.root) is not None)
    plan, at = plan_on(ckpt, d, spec, edit, keep_tied, target, allow_foreign_direction)
    return EditJob(source, ckpt, d, plan, at, spec, spec_info, [source.hf_dir, *inputs], edit.mode)


def orthogonalize(
    model: str | Path | ModelSource,
    direction: DirectionFile | str | Path | None,
    out: Path | str | None,
    mode: str = "ablate",
    coeff: float = 1.0,
    layer: int | None = None,
    site: str | None = None,
    unit: bool = False,
    dtype: str = "keep",
    max_shard_size: str | int | None = None,
    force: bool = False,
    keep_tied: bool = False,
    base_model: str | None = None,
    name: str | None = None,
    replace_any: bool = False,
    allow_nonfinite: bool = False,
    spec: EditSpec | str | Path | None = None,
    allow_foreign_direction: bool = False,
    format: str | None = None,
) -> EditOutcome:
    """Edit MODEL by `direction` and write a standalone checkpoint to `out` (see `refusal-edit orthogonalize`).

    `base_model` (a Hub id) names the model in the card; by default it follows from MODEL (a recipe's, a Hub
    id, the base model of an edited checkpoint) and stays unknown for a local folder - with a warning.
    `force` replaces a previous output of this tool (`replace_any`: any folder); `allow_nonfinite` writes
    NaN / inf values the edit or the cast produced, with a warning, instead of failing. `spec` is an edit
    variant (an `EditSpec`) or a tune front point (`front.json[#ID]`, which also names the direction).
    `format` (see `output_format`): `peft` writes a PEFT LoRA adapter folder, `gguf-lora` a llama.cpp LoRA
    adapter for a GGUF MODEL, instead of the edited model. A direction (or a front's direction) extracted from
    another model is an error unless `allow_foreign_direction`, which the record and the card then state.
    """
    parse_size(max_shard_size)  # a bad size fails before anything is read
    edit = DirectionEdit(mode, coeff, layer, site, unit)
    fmt = output_format(out, format)
    if fmt != "safetensors" and (dtype != "keep" or max_shard_size is not None):
        raise RefusalEditError(f"a {fmt} output keeps its own tensor types: drop `dtype`, `max_shard_size`")
    if fmt in ("peft", "gguf-lora") and keep_tied:
        raise RefusalEditError(f"an adapter ({fmt}) is always the exact, untied edit: drop `keep_tied`")
    if fmt in FILE_FORMATS:
        options = {"keep_tied": keep_tied, "force": force, "replace_any": replace_any, "spec": spec, "format": fmt}
        options["allow_foreign_direction"] = allow_foreign_direction
        return _orthogonalize_gguf(model, direction, out, edit, base_model=base_model, name=name, **options)
    assert out is not None
    write = _writer(Path(out))
    d = direction
    if isinstance(direction, str | Path):
        d = load_direction(sources.expand(str(direction)))
    source = sources.resolve_model(model)
    protected = [p for p in (source.hf_dir, source.origin, getattr(d, "path", None)) if p is not None]
    check_output(Path(out), force, protected, replace_any)  # a bad `out` fails before planning
    job = plan_job(source, d, edit, keep_tied, spec, allow_foreign_direction)
    check_output(Path(out), force, job.inputs, replace_any)
    ckpt, plan = job.ckpt, job.plan
    record = build_record(
        plan,
        job.direction,
        Path(out),
        base_model=sources.base_model(source, base_model),
        source_model={"path": str(ckpt.root), "name": ckpt.root.name},
        previous=EditRecord.load(ckpt.root),
        edit=edit,
        at=job.layer,
        dtype=dtype,
        name=name,
        format=fmt,
        spec=job.record_spec(),
        license=parent_license(ckpt.root),
    )
    if fmt == "peft":
        return _write_peft(job, record, Path(out), force=force, replace_any=replace_any)
    result = write(
        ckpt,
        plan,
        record,
        Path(out),
        max_shard_size=max_shard_size,
        force=force,
        dtype=dtype,
        inputs=job.inputs[1:],
        replace_any=replace_any,
        allow_nonfinite=allow_nonfinite,
    )
    warnings = list(result.write.warnings) + _unknown_base(record)
    return EditOutcome(result.write, result.plan, record, warnings)


def parent_license(folder: Path) -> str | None:
    """The `license` of the model card in `folder` (README.md's YAML), or None: the edit's card carries it."""
    from huggingface_hub import ModelCard

    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return None
    try:
        value = ModelCard.load(str(readme), ignore_metadata_errors=True).data.license
    except Exception:  # a card we cannot read names no licence; the edit goes on
        return None
    return value if isinstance(value, str) and value else None


def _unknown_base(record: EditRecord, what: str = "folder") -> list[str]:
    if record.base_model is not None:
        return []
    return [
        f"the base model is unknown (a local {what}): the model card names none; pass `base_model` ORG/NAME "
        "here, or to push (refusal-edit push DIR `push.repo` OWNER/NAME `push.base_model` ORG/NAME)"
    ]


def _write_peft(job: EditJob, record: EditRecord, out: Path, **options: Any) -> EditOutcome:
    """The edit as a PEFT LoRA adapter folder, with the record and its card (`library_name: peft`)."""
    from refusal_edit.adapters.peft import write_peft

    result = write_peft(
        job.ckpt,
        job.plan,
        out,
        base_model=record.base_model,
        extra_files=lambda tmp: record.save(tmp),
        inputs=tuple(job.inputs[1:]),
        **options,
    )
    job.plan.notes.extend(result.notes)
    return EditOutcome(result, job.plan, record, _unknown_base(record))  # type: ignore[arg-type]


def _orthogonalize_gguf(
    model: str | Path | ModelSource, direction: Any, out: Path | str | None, edit: DirectionEdit, **options: Any
) -> EditOutcome:
    """GGUF in, GGUF out: the GGUF editor plans on the file itself (`refusal_edit.gguf`); tensors keep their types."""
    from refusal_edit.workflows.gguf import orthogonalize_gguf

    if isinstance(model, ModelSource):
        model = model.origin if model.origin is not None else model.spec
    result = orthogonalize_gguf(model, direction, out, edit, **options)
    return EditOutcome(result.write, result.plan, result.record, result.warnings)
