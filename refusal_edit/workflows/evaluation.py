"""The `evaluate` workflow: resolve and load BASE (and EDITED, or a direction's hooks) and the judges,
compare (core), write the report, and on request record the summary in the edited checkpoint.

EDITED may be any checkpoint of BASE's architecture and vocabulary, including one another tool made (no
`refusal_edit.json`): it is compared all the same, only `record` needs this tool's record to write into.
Reports go to their own folder (default `runs/<base>/eval-<edit>`; hook runs are named after the
direction file), never replacing one without `force`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import refusal_edit.workflows.defaults as defaults
from refusal_edit.checkpoint.atomic import check_writable
from refusal_edit.checkpoint.record import RECORD, EditRecord
from refusal_edit.directions.artifacts import DirectionFile, load_direction
from refusal_edit.edits.spec import EditSpec
from refusal_edit.errors import RefusalEditError
from refusal_edit.evaluation.comparison import EvalReport, EvalSettings, compare
from refusal_edit.evaluation.comparison import rejudge as rejudge_saved
from refusal_edit.evaluation.report import REPORT_JSON, REPORT_PNG, report_json, write_report
from refusal_edit.forward import parse_batch_size, resolve_batch_size
from refusal_edit.interventions import Intervention
from refusal_edit.judging import Judge, MarkerJudge
from refusal_edit.judging.load import load_judge, load_llm_judge
from refusal_edit.judging.markers import REFUSAL_MARKERS, load_markers
from refusal_edit.judging.reasoning import parse_delimiters
from refusal_edit.loading.model import LoadedModel, ModelSource, context_length, load_model
from refusal_edit.paths import is_within
from refusal_edit.prompts import PromptSet, chat_format
from refusal_edit.prompts.template import parse_template_kwargs
from refusal_edit.workflows.planning import intervention_of, save_record

BORDERLINE = "builtin:borderline@test"  # the built-in over-refusal set's test split


def _markers(markers: str | Path | Sequence[str] | None) -> tuple[tuple[str, ...], str]:
    if markers is None:
        return REFUSAL_MARKERS, "builtin"
    if isinstance(markers, str | Path):
        return load_markers(defaults.expand(str(markers))), str(markers)
    values = tuple(m for m in markers if m.strip())
    if not values:
        raise RefusalEditError("the refusal marker list (`markers`) is empty")
    return values, "custom"


def build_judges(
    settings: EvalSettings,
    base: LoadedModel | None,
    markers: str | Path | Sequence[str] | None = None,
    dtype: str = "auto",
    device: str = "cpu",
) -> list[Judge]:
    """The judges `settings` names, loaded: the refusal markers first (the built-in list, or `markers`), then
    each other spec (`markers:FILE`, a classifier `hf:ORG/NAME` or directory), then the LLM judge
    (`judge_llm`: a model, or "base" to reuse the loaded base model)."""
    marker_list, marker_source = _markers(markers)
    judges: list[Judge] = [MarkerJudge(marker_list, marker_source)]
    for spec in settings.judges:
        if spec != "markers":
            judges.append(load_judge(defaults.expand(spec), labels=settings.judge_labels, device=device))
    if settings.judge_llm:
        reuse = settings.judge_llm == "base"
        if reuse and base is None:
            raise RefusalEditError("the LLM judge `base` is the base model: give the base model")
        judges.append(
            load_llm_judge(
                base.source if reuse and base is not None else defaults.resolve_model(settings.judge_llm, dtype),
                mode=settings.judge_llm_mode,
                rubric=settings.judge_llm_rubric,
                batch_size=max(1, settings.batch_size // 4),
                template_kwargs=settings.template_kwargs if reuse else None,
                dtype=dtype,
                device=device,
                loaded=base if reuse else None,
            )
        )
    names = [j.name for j in judges]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise RefusalEditError(f"judge {', '.join(twice)} given twice (`judges`)")
    return judges


def borderline_prompts(source: ModelSource, given: str | PromptSet | None, n: int | None) -> PromptSet:
    """The over-refusal prompts: the set or file given, else the built-in borderline set's test split."""
    return defaults.evaluation_prompts(source, "borderline", given if given is not None else BORDERLINE, n)


def hook_label(direction: DirectionFile, edit: EditSpec | None = None) -> str:
    """A hook run's name: the edit and the direction file (its sha256 tells runs of equal file names apart)."""
    edit = edit or EditSpec()
    stem = direction.path.stem if direction.path else "direction"
    what = edit.mode if edit.mode == "ablate" else f"{edit.mode}{edit.coeff:+g}"
    return f"{what}-{stem}-{direction.sha256[:8]}" if direction.sha256 else f"{what}-{stem}"


def default_out(base: ModelSource, label: str) -> Path:
    return defaults.default_out(base, f"eval-{label}")


def check_report_out(out: Path, force: bool) -> Path:
    """A report folder may exist (it is created as needed), but a report in it is replaced only with `force`."""
    target = Path(out)
    if target.exists() and not target.is_dir():
        raise RefusalEditError(f"output path is a file, not a directory: {out}")
    if not force and any((target / name).exists() for name in (REPORT_JSON, REPORT_PNG)):
        raise RefusalEditError(f"a report exists in {out} (`force` replaces it)")
    check_writable(target, Path(out))  # before any model is loaded
    return target


def _edit_of(source: ModelSource) -> dict[str, Any] | None:
    """The fields of an edited checkpoint's record that a report shows (None for a plain model)."""
    try:
        record = EditRecord.load(source.hf_dir)
    except RefusalEditError:
        return None
    if record is None:
        return None
    keys = ("mode", "coeff", "layer", "site", "direction_sha256", "direction_layer", "base_model")
    return {k: getattr(record, k) for k in keys}


def check_recordable(base: ModelSource, edited: ModelSource) -> EditRecord:
    """`record` writes BASE's numbers into EDITED's card: EDITED must be this tool's edit *of* BASE's
    architecture (same model type and shape), else the card would carry another model's numbers."""
    if edited.kind != "dir":
        raise RefusalEditError("`record` writes into an `edited` checkpoint directory (a refusal-edit checkpoint)")
    record = EditRecord.load(edited.hf_dir)
    if record is None:
        raise RefusalEditError(
            f"`record` needs `edited` to be a refusal-edit checkpoint directory (with {RECORD}): "
            f"{edited.hf_dir} has none (made by another tool?); evaluate it without `record`, the report has "
            "every number"
        )
    base_cfg, edited_cfg = base.config(), edited.config()
    was = record.source_model.get("model_type")
    if was is not None and was != base_cfg.get("model_type"):
        raise RefusalEditError(
            f"`edited` was edited from a {was} model, `base` is {base_cfg.get('model_type')}: `record` would write "
            "another model's numbers into its card"
        )
    for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
        a, b = _text_value(base_cfg, key), _text_value(edited_cfg, key)
        if a is not None and b is not None and a != b:
            raise RefusalEditError(
                f"`edited` and `base` differ in {key} ({b} vs {a}): `edited` is not an edit of `base`, so `record` "
                "would write another model's numbers into its card"
            )
    return record


COMPARABLE = ("hidden_size", "num_hidden_layers")


def check_comparable(base: ModelSource, edited: ModelSource) -> None:
    """EDITED must be a checkpoint of BASE's architecture: the same model type (or an edit of one, relabelled
    by this tool) and the same hidden size and layer count; else the KL and the side-by-side replies compare
    two unrelated models. (The vocabulary is compared once the tokenizers are loaded, token by token.)"""
    base_cfg, edited_cfg = base.config(), edited.config()
    types = base_cfg.get("model_type"), edited_cfg.get("model_type")
    try:
        record = EditRecord.load(edited.hf_dir)
    except RefusalEditError:
        record = None
    was = record.source_model.get("model_type") if record is not None else None
    if types[0] != types[1] and was != types[0]:
        raise RefusalEditError(
            f"`edited` is a {types[1]} model, `base` a {types[0]} model: evaluate compares two checkpoints of one "
            "architecture (an edit with its base)"
        )
    for key in COMPARABLE:
        a, b = _text_value(base_cfg, key), _text_value(edited_cfg, key)
        if a is not None and b is not None and a != b:
            raise RefusalEditError(
                f"`edited` and `base` differ in {key} ({b} vs {a}): evaluate compares two checkpoints of one "
                "architecture (an edit with its base)"
            )


def _text_value(config: dict[str, Any], key: str) -> Any:
    text = config.get("text_config")
    return config.get(key, text.get(key) if isinstance(text, dict) else None)


def check_one_edit(edited: Any, direction: Any, intervention: Any = None) -> None:
    """The one rule: an evaluation compares BASE with either an EDITED checkpoint or a direction's hooks."""
    given = sum(x is not None for x in (edited, direction, intervention))
    if given != 1:
        raise RefusalEditError(
            "give either `edited` or `direction`, not both" if given else "give either `edited` or `direction`"
        )


def evaluate(
    base: str | Path | ModelSource | LoadedModel,
    edited: str | Path | ModelSource | LoadedModel | None = None,
    *,
    direction: DirectionFile | str | Path | None = None,
    edit: EditSpec | None = None,
    intervention: Intervention | None = None,
    edited_info: dict[str, Any] | None = None,
    harmful: str | PromptSet | None = None,
    harmless: str | PromptSet | None = None,
    borderline: str | PromptSet | None = None,
    settings: EvalSettings | None = None,
    markers: str | Path | Sequence[str] | None = None,
    judges: Sequence[Judge] | None = None,
    system_prompt: str | None = None,
    template: str | Path | None = None,
    dtype: str = "auto",
    device: str = "cpu",
    max_memory: str | dict[Any, Any] | None = None,
    offload_dir: Path | None = None,
    batch_size: int | str | None = None,
    load_in: str | None = None,
) -> EvalReport:
    """Compare `base` with `edited` (a checkpoint) or with `base` under a direction's hooks.

    Exactly one of `edited`, `direction` (applied with `edit`, default the paper's ablation, as orthogonalize
    would bake it) and `intervention` (a ready-made `Intervention`) is given. `edited` may be
    any checkpoint of the same architecture and vocabulary, whoever made it. Prompts default to the test
    split of the recipe's sets, else the built-in ones (`borderline`: the built-in borderline set's test
    split, when `settings.borderline`); `system_prompt` to the recipe's, else the chat template's own.
    Judges are loaded from `settings` (`markers` replaces the built-in marker list), unless `judges` gives
    them ready-made. `device` auto places each model's layers with accelerate, each within `max_memory`;
    `load_in` (4bit|8bit) loads base and edited checkpoint quantized by bitsandbytes (`loading.quantize`);
    `batch_size` (a number or auto) replaces `settings.batch_size`. A loaded `base` keeps its replies: several
    edits compared with it generate them once (see `compare`). Errors the user can fix raise
    `RefusalEditError`.
    """
    check_one_edit(edited, direction, intervention)
    settings = settings or EvalSettings()
    settings.check()
    if judges is None:
        _markers(markers)  # a bad markers file fails before any model is loaded
    if direction is not None:
        edit = (edit or EditSpec()).check()  # before any file is read
        d = direction if isinstance(direction, DirectionFile) else load_direction(defaults.expand(str(direction)))
        intervention = intervention_of(d, edit)
        edited_info = {
            "direction_file": str(d.path),
            "direction_sha256": d.sha256,
            "direction_layer": d.layer,
            "direction_position": d.position,
            "unit": edit.unit,
            **(edited_info or {}),
        }

    t0 = time.perf_counter()
    base_source = base.source if isinstance(base, LoadedModel) else defaults.resolve_model(base, dtype)
    edited_source = None
    if edited is not None:
        edited_source = edited.source if isinstance(edited, LoadedModel) else defaults.resolve_model(edited, dtype)
        check_comparable(base_source, edited_source)  # before anything is loaded
    sets = {
        "harmful": defaults.evaluation_prompts(base_source, "harmful", harmful, settings.n),
        "harmless": defaults.evaluation_prompts(base_source, "harmless", harmless, settings.n),
    }
    if settings.borderline:
        sets["borderline"] = borderline_prompts(base_source, borderline, settings.n)
    placed = {"dtype": dtype, "device": device, "max_memory": max_memory, "offload_dir": offload_dir}
    placed["load_in"] = load_in
    base_lm = base if isinstance(base, LoadedModel) else load_model(base_source, **placed)
    fmt = chat_format(
        base_lm.tokenizer,
        system=defaults.system_prompt(base_source, system_prompt),
        template_file=template,
        template_kwargs=settings.template_kwargs,
    )
    fmt.check_context(sets, context_length(base_lm))
    edited_lm = None
    if edited is not None:
        assert edited_source is not None
        edited_lm = edited if isinstance(edited, LoadedModel) else load_model(edited_source, **placed)
        edited_info = {"edit": _edit_of(edited_source), **(edited_info or {})}
    timings = {"load_s": time.perf_counter() - t0}
    if batch_size is not None:
        texts = fmt.format_all([t for ps in sets.values() for t in ps.instructions])
        rows = resolve_batch_size(batch_size, base_lm.model, base_lm.tokenizer, texts, settings.max_new_tokens)
        settings = replace(settings, batch_size=rows)
        settings.check()
    if judges is None:
        t1 = time.perf_counter()
        judges = build_judges(settings, base_lm, markers, dtype=dtype, device=device)
        timings["load_judges_s"] = time.perf_counter() - t1
    return compare(
        base_lm,
        fmt,
        sets,
        edited=edited_lm,
        intervention=intervention,
        edited_info=edited_info,
        settings=settings,
        judges=judges,
        timings=timings,
    )


def save_report(report: EvalReport, out: Path, force: bool = False) -> tuple[Path, Path]:
    """Write `report.json` and `report.png` into `out`; an existing report is replaced only with `force`."""
    check_report_out(out, force)
    return write_report(report, out)


def record_evaluation(checkpoint: Path, report: EvalReport) -> Path:
    """Store `report.summary()` in an edited checkpoint's `refusal_edit.json` and re-render its README.md.

    Each file is replaced atomically, so an interrupted run leaves the old record, never half a file.
    """
    record = EditRecord.load(checkpoint, required=True)
    assert record is not None
    return save_record(record.with_evaluation(report.summary()), checkpoint)


@dataclass
class Evaluation:
    """A finished `evaluate` run: the report, where it was written, and the record it went into (if any)."""

    report: EvalReport
    json_path: Path
    png_path: Path
    recorded: Path | None = None

    def json_text(self) -> str:
        """The report as `report.json` holds it."""
        return report_json(self.report)


def run(
    base: str | Path | ModelSource,
    edited: str | Path | ModelSource | None = None,
    *,
    out: Path | None = None,
    force: bool = False,
    record: bool = False,
    allow_foreign_direction: bool = False,
    **options: Any,
) -> Evaluation:
    """`refusal-edit evaluate`: every check that can fail fast first, then `evaluate` (which takes
    `options`: the direction and its edit, prompts, settings, markers, ...), the report, the record.
    A direction extracted from another model than BASE is an error unless `allow_foreign_direction`."""
    direction = options.pop("direction", None)
    check_one_edit(edited, direction)
    if record and edited is None:
        raise RefusalEditError("`record` writes into an `edited` checkpoint; it does not apply to `direction`")
    edit = options.get("edit") or EditSpec()
    if direction is not None:
        edit.check()
        direction = (
            direction if isinstance(direction, DirectionFile) else load_direction(defaults.expand(str(direction)))
        )
    dtype = options.get("dtype", "auto")
    base_source = defaults.resolve_model(base, dtype)
    edited_source = defaults.resolve_model(edited, dtype) if edited is not None else None
    if record and edited_source is not None:
        check_recordable(base_source, edited_source)  # its message says what `record` would do wrong
        check_writable(edited_source.hf_dir, edited_source.hf_dir)
    if edited_source is not None:
        check_comparable(base_source, edited_source)
    if isinstance(direction, DirectionFile):
        defaults.check_direction(direction, base_source, allow_foreign_direction)
    if out is None:
        label = edited_source.name if edited_source is not None else hook_label(direction, edit)
        out = default_out(base_source, label)
    check_report_out(out, force)
    report = evaluate(base_source, edited_source, direction=direction, **options)
    json_path, png_path = save_report(report, out, force)
    recorded = record_evaluation(edited_source.hf_dir, report) if record and edited_source is not None else None
    return Evaluation(report, json_path, png_path, recorded)


JUDGE_SETTINGS = ("judges", "judge_labels", "judge_llm", "judge_llm_mode", "judge_llm_rubric")


def eval_settings(
    batch_size: int | str = 32,
    template_kwargs: Sequence[str] | dict[str, Any] | None = None,
    reasoning_delimiters: str | None = None,
    **fields: Any,
) -> tuple[EvalSettings, str | None]:
    """`EvalSettings` from the command's values (`fields`: the other settings as they are), and the batch size
    left to choose once the models are loaded (`auto`), else None: `batch_size` a number or `auto`,
    `template_kwargs` `key=value` items, `reasoning_delimiters` `OPEN,CLOSE`."""
    rows = parse_batch_size(batch_size)
    if template_kwargs is not None:
        fields["template_kwargs"] = parse_template_kwargs(template_kwargs)
    if reasoning_delimiters:
        fields["reasoning_delimiters"] = parse_delimiters(reasoning_delimiters)
    settings = EvalSettings(batch_size=1 if rows == "auto" else int(rows), **fields)
    return settings, "auto" if rows == "auto" else None


def rejudge(
    report: str | Path,
    base: str | Path | ModelSource | LoadedModel | None = None,
    *,
    out: Path | None = None,
    force: bool = False,
    settings: EvalSettings | None = None,
    markers: str | Path | Sequence[str] | None = None,
    dtype: str = "auto",
    device: str = "cpu",
    verdicts: dict[str, Any] | None = None,
) -> Evaluation:
    """`evaluate --rejudge REPORT`: a saved report's replies judged again by the judges `settings` names
    (`evaluation.comparison.rejudge`: nothing generated, the KL numbers carried over), written to `out` (default:
    the report's folder + `-rejudged`; never the report's own folder). `base` is loaded only for the LLM
    judge `base`. `verdicts`: a dict kept across calls, so replies already judged (the same base replies in
    every report of a benchmark) are not judged again (`evaluation.comparison.rejudge`)."""
    path = Path(defaults.expand(str(report)))
    path = path / REPORT_JSON if path.is_dir() else path
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RefusalEditError(f"cannot read the report {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not isinstance(saved, dict):
        raise RefusalEditError(f"{path} is not an evaluate report")
    settings = settings or EvalSettings()
    settings.check()
    _markers(markers)
    target = Path(out) if out is not None else path.parent.with_name(path.parent.name + "-rejudged")
    if is_within(target.resolve(), path.parent.resolve()):
        raise RefusalEditError(f"`out` {target} holds the report being judged again: give another folder")
    check_report_out(target, force)
    loaded = None  # build_judges says so when the LLM judge `base` needs it and none is given
    if settings.judge_llm == "base" and base is not None:
        loaded = (
            base
            if isinstance(base, LoadedModel)
            else load_model(defaults.resolve_model(base, dtype), dtype=dtype, device=device)
        )
    judges = build_judges(settings, loaded, markers, dtype=dtype, device=device)
    new = rejudge_saved(saved, judges, {k: getattr(settings, k) for k in JUDGE_SETTINGS}, verdicts)
    json_path, png_path = save_report(new, target, force)
    return Evaluation(new, json_path, png_path)
