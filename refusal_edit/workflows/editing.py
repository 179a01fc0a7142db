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

import refusal_edit.workflows.defaults as defaults
from refusal_edit.adapters.peft import write_peft
from refusal_edit.checkpoint.atomic import check_output
from refusal_edit.checkpoint.layout import Checkpoint, open_checkpoint
from refusal_edit.checkpoint.record import EditRecord
from refusal_edit.directions import identity
from refusal_edit.directions.artifacts import DirectionFile, load_direction
from refusal_edit.edits import EditResult, parse_size, write_checkpoint
from refusal_edit.edits.plan import EditPlan
from refusal_edit.edits.preview import PlannedTensor, planned_tensors
from refusal_edit.edits.spec import EditSpec, describe_variant
from refusal_edit.errors import RefusalEditError
from refusal_edit.gguf.lora import write_gguf_lora
from refusal_edit.loading.model import ModelSource
from refusal_edit.recipes import find_recipe
from refusal_edit.workflows.gguf import orthogonalize_gguf
from refusal_edit.workflows.planning import build_record, edit_inputs, plan_on, save_record, target_identity


@dataclass
class EditOutcome(EditResult):
    """The written checkpoint, its plan and record, and warnings for the user (e.g. an unknown base model)."""

    record: EditRecord | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def variant(self) -> str | None:
        """The edit variant in words, when the edit is one (a variant or a tune front point)."""
        return describe_variant(self.record.spec) if self.record is not None else None


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
        extra_files=lambda tmp: save_record(record, tmp),
        **options,
    )
    return EditResult(result, plan)


@dataclass
class EditJob:
    """An edit decided but not written: what the record and the writer need."""

    source: ModelSource
    ckpt: Checkpoint
    direction: DirectionFile
    plan: EditPlan
    layer: int | None  # where an addition goes
    edit: EditSpec
    spec_info: dict[str, Any] | None  # what the record keeps of a variant or front point (`edit_inputs`)
    inputs: list[Path]

    @property
    def variant(self) -> str | None:
        """The edit in words, when it is a variant or a tune front point."""
        return None if self.spec_info is None else self.edit.describe()


def plan_job(
    model: str | Path | ModelSource,
    direction: DirectionFile | str | Path | None,
    edit: EditSpec | str | Path | None = None,
    keep_tied: bool = False,
    allow_foreign_direction: bool = False,
) -> EditJob:
    """Resolve MODEL, the direction and the edit (an `EditSpec` or a tune front point), and plan the edit
    (nothing written: `plan_only` shows it)."""
    d, edit, spec_info = edit_inputs(direction, edit)
    source = defaults.resolve_model(model)
    inputs = [p for p in (d.path, source.origin) if p is not None]
    ckpt = open_checkpoint(source.hf_dir)
    weights = identity.known_weights_sha256(source.hf_dir, source.sha256)
    target = target_identity(ckpt.config, source.name, weights, EditRecord.load(ckpt.root) is not None)
    plan, at = plan_on(ckpt, d, edit, keep_tied, target, allow_foreign_direction)
    return EditJob(source, ckpt, d, plan, at, edit, spec_info, [source.hf_dir, *inputs])


def preview(
    model: str | Path | ModelSource,
    direction: DirectionFile | str | Path | None,
    edit: EditSpec | str | Path | None = None,
    keep_tied: bool = False,
    allow_foreign_direction: bool = False,
) -> tuple[EditJob, list[PlannedTensor]]:
    """`orthogonalize` with `plan_only`: the planned edit and every tensor it would change; nothing is written."""
    job = plan_job(model, direction, edit, keep_tied, allow_foreign_direction)
    return job, planned_tensors(job.plan, job.ckpt)


def orthogonalize(
    model: str | Path | ModelSource,
    direction: DirectionFile | str | Path | None,
    out: Path | str | None,
    edit: EditSpec | str | Path | None = None,
    *,
    dtype: str = "keep",
    max_shard_size: str | int | None = None,
    force: bool = False,
    keep_tied: bool = False,
    base_model: str | None = None,
    name: str | None = None,
    replace_any: bool = False,
    allow_nonfinite: bool = False,
    allow_foreign_direction: bool = False,
    format: str | None = None,
) -> EditOutcome:
    """Edit MODEL by `direction` and write a standalone checkpoint to `out` (see `refusal-edit orthogonalize`).

    `base_model` (a Hub id) names the model in the card; by default it follows from MODEL (a recipe's, a Hub
    id, the base model of an edited checkpoint) and stays unknown for a local folder - with a warning.
    `force` replaces a previous output of this tool (`replace_any`: any folder); `allow_nonfinite` writes
    NaN / inf values the edit or the cast produced, with a warning, instead of failing. `edit` is the edit (an
    `EditSpec`; default: the paper's ablation) or a tune front point (`front.json[#ID]`, which also names the
    direction).
    `format` (see `output_format`): `peft` writes a PEFT LoRA adapter folder, `gguf-lora` a llama.cpp LoRA
    adapter for a GGUF MODEL (or for an HF MODEL as llama.cpp converts it), instead of the edited model. A
    direction (or a front's direction) extracted from another model is an error unless
    `allow_foreign_direction`, which the record and the card then state.
    """
    parse_size(max_shard_size)  # a bad size fails before anything is read
    fmt = output_format(out, format)
    if fmt != "safetensors" and (dtype != "keep" or max_shard_size is not None):
        raise RefusalEditError(f"a {fmt} output keeps its own tensor types: drop `dtype`, `max_shard_size`")
    if fmt in ("peft", "gguf-lora") and keep_tied:
        raise RefusalEditError(f"an adapter ({fmt}) is always the exact, untied edit: drop `keep_tied`")
    if fmt == "gguf" or (fmt == "gguf-lora" and _gguf_input(model)):
        options = {"keep_tied": keep_tied, "force": force, "replace_any": replace_any, "format": fmt}
        options["allow_foreign_direction"] = allow_foreign_direction
        return _orthogonalize_gguf(model, direction, out, edit, base_model=base_model, name=name, **options)
    d = direction
    if isinstance(direction, str | Path):
        d = load_direction(defaults.expand(str(direction)))
    source = defaults.resolve_model(model)
    if out is None:  # gguf-lora of an HF model: ggml's file-name convention, as for a GGUF
        out = defaults.default_out(source, f"{source.name}-abliterated-LoRA.gguf")
    write = _writer(Path(out))
    protected = [p for p in (source.hf_dir, source.origin, getattr(d, "path", None)) if p is not None]
    check_output(Path(out), force, protected, replace_any)  # a bad `out` fails before planning
    job = plan_job(source, d, edit, keep_tied, allow_foreign_direction)
    check_output(Path(out), force, job.inputs, replace_any)
    ckpt, plan = job.ckpt, job.plan
    record = build_record(
        plan,
        job.direction,
        Path(out),
        base_model=defaults.base_model(source, base_model),
        source_model={"path": str(ckpt.root), "name": ckpt.root.name},
        previous=EditRecord.load(ckpt.root),
        edit=job.edit,
        at=job.layer,
        dtype=dtype,
        name=name,
        format=fmt,
        spec_info=job.spec_info,
        license=parent_license(ckpt.root),
    )
    if fmt == "peft":
        return _write_peft(job, record, Path(out), force=force, replace_any=replace_any)
    if fmt == "gguf-lora":
        return _write_hf_gguf_lora(job, record, Path(out), force=force, replace_any=replace_any)
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
    result = write_peft(
        job.ckpt,
        job.plan,
        out,
        base_model=record.base_model,
        extra_files=lambda tmp: save_record(record, tmp),
        inputs=tuple(job.inputs[1:]),
        **options,
    )
    job.plan.notes.extend(result.notes)
    return EditOutcome(result, job.plan, record, _unknown_base(record))  # type: ignore[arg-type]


def _write_hf_gguf_lora(job: EditJob, record: EditRecord, out: Path, **options: Any) -> EditOutcome:
    """The edit of an HF model as a llama.cpp LoRA adapter GGUF for its llama.cpp conversion (GGUF names)."""
    result = write_gguf_lora(job.ckpt, job.plan, out, record=record.to_dict(), inputs=tuple(job.inputs[1:]), **options)
    job.plan.notes.extend(result.notes)
    return EditOutcome(result, job.plan, record, _unknown_base(record))  # type: ignore[arg-type]


def _gguf_input(model: str | Path | ModelSource) -> bool:
    """Whether MODEL is a GGUF file to write a GGUF adapter for directly (a .gguf path, or a recipe, which
    fetches one), rather than an HF model (a folder or a Hub id) whose conversion the adapter is for."""
    if isinstance(model, ModelSource):
        return model.origin is not None
    path = Path(str(model)).expanduser()
    return path.suffix.lower() == ".gguf" or (not path.is_dir() and find_recipe(str(model)) is not None)


def _orthogonalize_gguf(
    model: str | Path | ModelSource, direction: Any, out: Path | str | None, edit: Any, **options: Any
) -> EditOutcome:
    """GGUF in, GGUF out: the GGUF editor plans on the file itself (`refusal_edit.gguf`); tensors keep their types."""
    if isinstance(model, ModelSource):
        model = model.origin if model.origin is not None else model.spec
    result = orthogonalize_gguf(model, direction, out, edit, **options)
    return EditOutcome(result.write, result.plan, result.record, result.warnings)
