"""The `confirm` workflow: edit points confirmed on more prompts than `tune` can afford.

Tune's own confirmer (greedy replies judged by the markers, degenerate replies counted apart; first-token and
multi-token KL on harmless val prompts) on any split of the prompt sets, every point in one run against the
same base continuations. Near the paper's edit the refusal rates are a few percent, and 32 (tune's val) or
100 (the test split) harmful prompts cannot tell 1 % from 3 %; the 240 train prompts can, a little better.

`cross_fit` (train split only) is fair to edits with more fitted directions (`tuning.crossfit`): each half of
the train prompts makes the edits judged on the other half, and the counts are pooled (the KLs averaged).
Without it each layer's own candidate is judged on the very prompts it was fitted to, which flatters the
per-layer edits.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import refusal_edit.workflows.defaults as defaults
from refusal_edit.checkpoint.atomic import check_writable
from refusal_edit.console import err
from refusal_edit.directions.artifacts import load_direction
from refusal_edit.directions.bank import load_bank
from refusal_edit.directions.halves import halves_beside
from refusal_edit.directions.refusal_tokens import user_refusal_tokens
from refusal_edit.edits.spec import DirectionBank, EditSpec
from refusal_edit.errors import RefusalEditError
from refusal_edit.loading.model import ModelSource, load_model
from refusal_edit.prompts import chat_format
from refusal_edit.tuning.confirm import Confirmer
from refusal_edit.tuning.crossfit import fold_banks, pooled
from refusal_edit.workflows.tune import extract_settings

SPLITS = ("train", "val", "test")


def load_points(path: Path) -> dict[str, EditSpec]:
    """label -> edit spec, from a `{label: spec}` JSON file (`{}` is the paper's edit) or from a front.json
    (every confirmed point)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RefusalEditError(f"cannot read `points` {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if isinstance(data, dict) and isinstance(data.get("confirmed"), list):
        data = {p["id"]: p["spec"] for p in data["confirmed"]}
    elif not isinstance(data, dict) or not data or not all(isinstance(v, dict) for v in data.values()):
        raise RefusalEditError(f"{path}: expected {{label: spec}} or a front.json")
    return {str(label): EditSpec.from_json(spec) for label, spec in data.items()}


def check_out(out: Path | None, points: Path, force: bool) -> None:
    """Refuse, before any work, an `out` that would overwrite the points file (or what a symlink to it names)
    or, without `force`, any other existing file; an existing directory is never a valid `out`."""
    if out is None:
        return
    if out.is_dir():
        raise RefusalEditError(f"`out` {out} is a directory; give a .json file")
    if out.exists() and points.exists() and out.samefile(points):
        raise RefusalEditError(f"`out` {out} is the `points` file; give another file")
    if out.exists() and not force:
        raise RefusalEditError(f"`out` {out} exists (`force` replaces it)")
    check_writable(out.parent, out)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """`data` as JSON at `path`, whole or not at all (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


@dataclass
class ConfirmOutcome:
    """Every point's numbers (`Confirmed.to_json()` without samples; pooled over the halves with `cross_fit`)."""

    split: str
    cross_fit: bool
    harmful: dict[str, Any]
    harmless: dict[str, Any]
    points: dict[str, dict[str, Any]]
    seconds: float = 0.0
    out: Path | None = None
    halves: list[str] = field(default_factory=list)  # what each half was fitted on and judged on

    def to_json(self) -> dict[str, Any]:
        keys = ("split", "cross_fit", "harmful", "harmless", "points")
        return {k: getattr(self, k) for k in keys}


def confirm_points(
    model: str | Path | ModelSource,
    direction: str | Path,
    points: str | Path | Mapping[str, EditSpec],
    *,
    split: str = "train",
    cross_fit: bool = False,
    kl_prompts: int = 16,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    out: Path | None = None,
    force: bool = False,
    dtype: str = "auto",
    device: str = "cpu",
) -> ConfirmOutcome:
    """Confirm `points` (a points file, see `load_points`, or label -> `EditSpec`) by `direction` on MODEL's
    `split` harmful prompts (the recipe's sets, else the built-in ones) under its default chat format, with
    the KL on `kl_prompts` harmless val prompts; `cross_fit` as the module docstring says. The result goes to
    `out` (JSON) when given: never over the points file, over another file only with `force`."""
    if split not in SPLITS:
        raise RefusalEditError(f"unknown `split` {split!r} ({', '.join(SPLITS)})")
    if cross_fit and split != "train":
        raise RefusalEditError("`cross_fit` splits the train prompts; it needs `split` train")
    if isinstance(points, str | Path):
        check_out(Path(out) if out is not None else None, Path(points), force)
        specs = load_points(Path(points))
    else:
        specs = dict(points)
    bank, d = load_bank(load_direction(defaults.expand(str(direction))))
    source = defaults.resolve_model(model, dtype)
    lm = load_model(source, dtype=dtype, device=device)
    fmt = chat_format(lm.tokenizer, system=defaults.system_prompt(source, None))  # the model's default
    sets = defaults.extraction_prompts(source, None, None)
    harmful = sets["harmful"].split(split)
    harmless = sets["harmless"].split("val").sample(kl_prompts)
    err.print(f"{len(harmful)} harmful {split} prompts, {len(harmless)} harmless val prompts")
    kl_texts = fmt.format_all(harmless.instructions)
    start = time.perf_counter()

    def measure(prompts: list[str], edit_bank: DirectionBank) -> dict[str, dict[str, Any]]:
        """Every point made from `edit_bank`, judged on the harmful `prompts` (numbers without samples)."""
        confirmer = Confirmer(
            lm.model, lm.tokenizer, prompts, fmt.format_all(prompts), kl_texts, max_new_tokens, batch_size
        )
        measured = confirmer.measure(list(specs.items()), edit_bank)
        return {
            label: {k: v for k, v in m.to_json().items() if k != "samples"}
            for label, m in zip(specs, measured, strict=True)
        }

    halves = []
    if not cross_fit:
        rows = measure(harmful.instructions, bank)
    else:
        ids = user_refusal_tokens(lm.tokenizer, json.loads(d.metadata.get("refusal_tokens", "[]"))).ids
        harmless_train = sets["harmless"].split("train").instructions
        folds = fold_banks(
            lm.model,
            lm.tokenizer,
            fmt,
            harmful.instructions,
            harmless_train,
            ids,
            bank.position,
            bank.layer,
            batch_size=batch_size,
            filter_train=bool(extract_settings(d).get("filter_train", True)),
            kept=halves_beside(d.path, harmful.instructions, harmless_train),
        )
        per_point: dict[str, list[dict[str, Any]]] = {label: [] for label in specs}
        for k, fold in enumerate(folds):
            halves.append(
                f"half {k + 1}: candidates from {fold.fitted[0]} harmful / {fold.fitted[1]} harmless prompts, "
                f"judged on {len(fold.judged)}"
            )
            err.print(halves[-1])
            for label, numbers in measure(fold.judged, fold.bank).items():
                per_point[label].append(numbers)
        rows = {label: pooled(measured) for label, measured in per_point.items()}
    outcome = ConfirmOutcome(
        split, cross_fit, harmful.describe(), harmless.describe(), rows, time.perf_counter() - start, halves=halves
    )
    if out is not None:
        write_json(Path(out), outcome.to_json())
        outcome.out = Path(out)
    return outcome
