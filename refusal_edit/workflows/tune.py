"""The `tune` workflow: resolve and load MODEL, build the proxies and the confirmer, run the study (core),
write `front.json` and `front.png`.

The output folder holds the Optuna journal (`study.journal`, so `resume` continues a study), then
`front.json` (every trial, every confirmed point with its full edit spec, the pick and its rule, the
direction it draws on, chat format, prompts, settings, versions) and `front.png`. Both files are written
whole (temporary file, then rename). `force` starts over: it removes only these files of a previous run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import refusal_edit.workflows.defaults as defaults
from refusal_edit.checkpoint.atomic import check_writable
from refusal_edit.console import console
from refusal_edit.directions.artifacts import DirectionFile, load_direction
from refusal_edit.directions.bank import load_bank
from refusal_edit.directions.halves import halves_beside
from refusal_edit.directions.refusal_tokens import derive_refusal_tokens, user_refusal_tokens
from refusal_edit.errors import RefusalEditError
from refusal_edit.forward import parse_batch_size, resolve_batch_size
from refusal_edit.loading.model import LoadedModel, ModelSource, load_model
from refusal_edit.offload import offloaded_modules
from refusal_edit.prompts import chat_format
from refusal_edit.prompts.template import parse_template_kwargs
from refusal_edit.provenance import versions
from refusal_edit.tuning import Confirmer, PickRule, ProxyScorer, TuneResult, TuneSettings, plot_front
from refusal_edit.tuning import tune as run_tune
from refusal_edit.tuning.crossfit import CrossFit, fold_banks
from refusal_edit.tuning.run import STUDY

FRONT_JSON = "front.json"
FRONT_PNG = "front.png"
OURS = (STUDY, FRONT_JSON, FRONT_PNG)


@dataclass
class TuneOutcome:
    result: TuneResult
    out: Path
    front_json: Path
    front_png: Path
    data: dict[str, Any]


def _prepare_out(out: Path, resume: bool, force: bool) -> None:
    """`out` is a folder of this tool's tune files: new, resumed, or (with `force`) cleared of them."""
    if out.exists() and not out.is_dir():
        raise RefusalEditError(f"output path is a file, not a directory: {out}")
    check_writable(out, out)
    if out.is_dir():
        foreign = [p.name for p in out.iterdir() if p.name not in OURS and not p.name.startswith(".")]
        if foreign:
            raise RefusalEditError(
                f"`out` {out} holds other files ({', '.join(sorted(foreign)[:3])}); give a folder of its own"
            )
        has_study = (out / STUDY).exists()
        if has_study and not resume and not force:
            raise RefusalEditError(f"a study exists in {out} (`resume` continues it, `force` starts over)")
        if force and not resume:
            for name in OURS:
                (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def tune_settings(values: Mapping[str, Any]) -> tuple[TuneSettings, str | None]:
    """`TuneSettings` from a command's values, each field by its name (`values` may hold more), checked; and the
    batch size left to choose once the model is loaded (`auto`), else None. `pick` is a rule's text with its
    `max_kl` cap and its held-out `margin` (`PickRule.parse`, `PickRule.parse_margin`: points or `off`; absent:
    the default), `batch_size` a number or `auto`."""
    given = {f.name: values[f.name] for f in fields(TuneSettings) if f.name in values}
    rows = parse_batch_size(given.pop("batch_size", 32))
    if "pick" in given:
        margin = PickRule.parse_margin(values.get("margin"))
        given["pick"] = PickRule.parse(given["pick"], values.get("max_kl"), margin)
    settings = TuneSettings(batch_size=1 if rows == "auto" else int(rows), **given).check()
    return settings, "auto" if rows == "auto" else None


def refusal_ids(lm: LoadedModel, direction: DirectionFile, fmt, harmful: list[str], harmless: list[str]) -> list[int]:
    """The refusal tokens extraction derived (recorded in the direction file), else derived now."""
    recorded = direction.metadata.get("refusal_tokens")
    if recorded:
        try:
            words = json.loads(recorded)
        except ValueError:
            words = None
        if isinstance(words, list) and words and all(isinstance(w, str) for w in words):
            return user_refusal_tokens(lm.tokenizer, words).ids
    return derive_refusal_tokens(lm.model, lm.tokenizer, fmt, harmful, harmless).ids


def tune(
    model: str | Path | ModelSource,
    direction: str | Path | DirectionFile,
    out: Path | str | None = None,
    *,
    settings: TuneSettings | None = None,
    n_val: int = 32,
    harmful: str | None = None,
    harmless: str | None = None,
    system_prompt: str | None = None,
    template: str | Path | None = None,
    template_kwargs: Sequence[str] | Mapping[str, Any] | None = None,
    dtype: str = "auto",
    device: str = "cpu",
    resume: bool = False,
    force: bool = False,
    max_memory: str | dict[Any, Any] | None = None,
    offload_dir: Path | None = None,
    batch_size: int | str | None = None,
    allow_foreign_direction: bool = False,
    load_in: str | None = None,
) -> TuneOutcome:
    """Search and confirm the refusal-vs-damage front of MODEL's edits by `direction` (module docstring).

    `device` auto places the layers with accelerate within `max_memory`; `batch_size` (a number or auto)
    replaces `settings.batch_size`. A direction from another model is an error unless `allow_foreign_direction`."""
    settings = (settings or TuneSettings()).check()
    kwargs = parse_template_kwargs(template_kwargs)  # `key=value` items or a keyword dict; bad ones fail first
    if n_val < 2:
        raise RefusalEditError(f"`n_val` must be at least 2, got {n_val}")
    d = direction if isinstance(direction, DirectionFile) else load_direction(defaults.expand(str(direction)))
    bank, d = load_bank(d)
    source = defaults.resolve_model(model, dtype)
    defaults.check_direction(d, source, allow_foreign_direction)
    target = Path(out).expanduser() if out is not None else defaults.default_out(source, "tune")
    _prepare_out(target, resume, force)
    lm = load_model(source, dtype=dtype, device=device, max_memory=max_memory, offload_dir=offload_dir, load_in=load_in)
    if settings.preserve_norm and (offloaded_modules(lm.model) or lm.load_in):
        settings = replace(settings, preserve_norm=False)
        why = f"this model is loaded in {lm.load_in}" if lm.load_in else "some of this model's weights are offloaded"
        console.print(
            f"[yellow]note:[/yellow] norm-preserving edits rewrite weights in memory, and {why}: they are left "
            "out of the search"
        )
    fmt = chat_format(
        lm.tokenizer,
        system=defaults.system_prompt(source, system_prompt),
        template_file=template,
        template_kwargs=kwargs,
    )
    sets = defaults.extraction_prompts(source, harmful, harmless)
    h_val, s_val = sets["harmful"].split("val").sample(n_val), sets["harmless"].split("val").sample(n_val)
    if len(h_val) < 2 or len(s_val) < 2:
        raise RefusalEditError("the validation splits need at least 2 prompts per side")
    h_texts, s_texts = fmt.format_all(h_val.instructions), fmt.format_all(s_val.instructions)
    if batch_size is not None:
        rows = resolve_batch_size(batch_size, lm.model, lm.tokenizer, h_texts + s_texts, settings.max_new_tokens)
        settings = replace(settings, batch_size=rows)
    ids = refusal_ids(lm, d, fmt, h_val.instructions, s_val.instructions)
    n_layers = int(lm.model.config.get_text_config().num_hidden_layers)
    k = settings.search_prompts
    scorer = ProxyScorer(lm.model, lm.tokenizer, h_texts, s_texts[:k], ids, settings.batch_size, keep_harmful=k)
    confirmer = Confirmer(
        lm.model, lm.tokenizer, h_val.instructions, h_texts, s_texts[:k], settings.max_new_tokens, settings.batch_size
    )
    made = extract_settings(d)
    n_train = made.get("n_train") if isinstance(made.get("n_train"), int) else None
    h_train, s_train = sets["harmful"].split("train").sample(n_train), sets["harmless"].split("train").sample(n_train)

    kept_halves = halves_beside(d.path, h_train.instructions, s_train.instructions)

    def crossfit() -> CrossFit:
        folds = fold_banks(
            lm.model,
            lm.tokenizer,
            fmt,
            h_train.instructions,
            s_train.instructions,
            ids,
            bank.position,
            bank.layer,
            settings.batch_size,
            filter_train=bool(made.get("filter_train", True)),
            kept=kept_halves,
        )
        return CrossFit(
            lm.model,
            lm.tokenizer,
            fmt,
            folds,
            settings.resolve_tokens,
            settings.batch_size,
            settings.resolve_prompts,
        )

    result = run_tune(
        scorer,
        confirmer,
        bank,
        n_layers,
        settings,
        target / STUDY,
        resume=resume,
        crossfit=crossfit if bank.position is not None and bank.layer is not None else None,
    )
    data = {
        "tool": "refusal-edit",
        "model": lm.source.describe(),
        "dtype": lm.dtype,
        "device": lm.device,
        "load_in": lm.load_in,
        "direction": {
            "path": str(d.path.resolve()) if d.path else None,
            "sha256": d.sha256,
            "layer": d.layer,
            "position": d.position,
            "candidates": bank.mean_diff is not None,
        },
        "chat_format": fmt.describe(),
        "prompts": {
            "harmful_val": h_val.describe(),
            "harmless_val": s_val.describe(),
            "search": f"the {k} harmful val prompts the base model refuses most; the first {k} harmless val prompts "
            "(also the KL of the confirmation)",
            "harmful_train": h_train.describe(),
            "harmless_train": s_train.describe(),
            "resolved": "cross-fitted: each half of the train prompts' candidates make the edits judged on the "
            "other half's harmful prompts",
        },
        "refusal_token_ids": ids,
        **result.to_json(),
        "versions": versions(),
    }
    _write_json(target / FRONT_JSON, data)
    png = plot_front(data, target / f".{FRONT_PNG}.tmp.png")
    os.replace(png, target / FRONT_PNG)
    return TuneOutcome(result, target, target / FRONT_JSON, target / FRONT_PNG, data)


def extract_settings(d: DirectionFile) -> dict[str, Any]:
    """The settings extract recorded beside the direction (its run.json; empty when there is none), so that
    cross-fitting makes its candidates as extract made the direction's: the same train prompts, filtered alike."""
    run_json = d.path.parent / "run.json" if d.path is not None else None
    try:
        recorded = json.loads(run_json.read_text()).get("settings", {}) if run_json and run_json.is_file() else {}
    except (OSError, ValueError, AttributeError):
        recorded = {}
    return recorded if isinstance(recorded, dict) else {}


def load_front_point(spec: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """`front.json[#ID]` -> (the front file's data, the confirmed point: ID, else the picked one)."""
    text = str(spec)
    path_text, _, point_id = text.partition("#")
    path = Path(path_text).expanduser()
    if path.is_dir():
        path = path / FRONT_JSON
    if not path.is_file():
        raise RefusalEditError(f"front file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RefusalEditError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("confirmed"), list):
        raise RefusalEditError(f"{path} is not a front written by refusal-edit tune")
    wanted = point_id or data.get("chosen")
    for point in data["confirmed"]:
        if isinstance(point, dict) and point.get("id") == wanted:
            return data, point
    ids = ", ".join(str(p.get("id")) for p in data["confirmed"] if isinstance(p, dict))
    raise RefusalEditError(f"{path} has no confirmed point {wanted!r} (confirmed: {ids})")
