"""`tune`: search the edit variants for the refusal-vs-damage front, then confirm the best points.

1. Search: an Optuna multi-objective study (TPE) over `SearchSpace`; every trial is the edit applied in
   memory (hooks, or in-place weights for norm preservation - nothing is written), scored by the two
   proxies of `proxies`. The study lives in a journal file, so an interrupted or finished study resumes.
2. Confirm: the paper's edit (for reference) and up to `confirm` points spread along the low-refusal part
   of the proxy front are measured by greedy generation and teacher-forced KL (`confirm`).
3. Pick: the documented rule of `front.pick` among the confirmed points.
Only confirmed points are offered; `front.json` keeps every trial too.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from refusal_edit.console import err, progress
from refusal_edit.edits.spec import DirectionBank, EditSpec, resolve
from refusal_edit.errors import RefusalEditError, check_at_least
from refusal_edit.tuning.confirm import Confirmer
from refusal_edit.tuning.front import pareto, pick, spread
from refusal_edit.tuning.proxies import ProxyScorer
from refusal_edit.tuning.space import SearchSpace

STUDY = "study.journal"


@dataclass
class TuneSettings:
    trials: int = 32  # Optuna trials in all (seeds included); a resumed study runs up to this many
    confirm: int = 4  # front points confirmed by generation (plus the paper's edit for reference)
    max_kl: float = 0.1  # the pick rule's first-token KL budget (nats)
    search_prompts: int = 16  # per side in the search: the most-refused harmful val prompts, harmless val prompts
    max_new_tokens: int = 48  # confirmation: greedy reply length, and the continuation length of the KL
    batch_size: int = 32
    seed: int = 0
    startup: int = 6  # random trials after the seeds before TPE takes over
    preserve_norm: bool = True  # search norm preservation too (in-place weight edits per trial)
    low_refusal: float = 0.5  # confirm only points whose refusal proxy is at most this fraction of the base's

    def check(self) -> TuneSettings:
        check_at_least(
            1,
            trials=self.trials,
            confirm=self.confirm,
            max_new_tokens=self.max_new_tokens,
            search_prompts=self.search_prompts,
            batch_size=self.batch_size,
        )
        return self


@dataclass
class TuneResult:
    trials: list[dict[str, Any]]
    confirmed: list[dict[str, Any]]
    base: dict[str, Any]
    chosen: str | None
    rule: str
    within_max_kl: bool
    settings: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def point(self, point_id: str | None = None) -> dict[str, Any]:
        """A confirmed point by id (default: the picked one)."""
        wanted = point_id or self.chosen
        for p in self.confirmed:
            if p["id"] == wanted:
                return p
        ids = ", ".join(p["id"] for p in self.confirmed)
        raise RefusalEditError(f"no confirmed point {wanted!r} (confirmed: {ids})")


def _study(storage: Path, settings: TuneSettings, resume: bool, seeds: int = 0):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(logging.WARNING)
    if storage.exists() and not resume:
        raise RefusalEditError(f"a study exists in {storage.parent} (`resume` continues it, `force` starts over)")
    sampler = optuna.samplers.TPESampler(
        # Random exploration after the seeds: TPE would otherwise model only the seeds' region.
        seed=settings.seed,
        n_startup_trials=seeds + settings.startup,
        multivariate=True,
        group=True,
    )
    backend = JournalStorage(JournalFileBackend(str(storage)))
    return optuna.create_study(
        study_name="tune",
        storage=backend,
        directions=["minimize", "minimize"],
        sampler=sampler,
        load_if_exists=True,
    )


def _trial_record(t: Any) -> dict[str, Any]:
    values = t.values or [None, None]
    return {
        "number": t.number,
        "spec": t.user_attrs.get("spec"),
        "refusal_proxy": values[0],
        "kl_proxy": values[1],
        "refusal_logodds": t.user_attrs.get("refusal_logodds"),
        "seconds": t.user_attrs.get("seconds"),
        "seed": t.user_attrs.get("seed", False),
    }


def search(
    scorer: ProxyScorer,
    space: SearchSpace,
    bank: DirectionBank,
    settings: TuneSettings,
    storage: Path,
    resume: bool = False,
) -> list[dict[str, Any]]:
    """Run the study up to `settings.trials` completed trials; every trial's record, in order."""
    import optuna

    study = _study(storage, settings, resume, seeds=len(space.seeds()))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not study.trials:
        for params in space.seeds():
            study.enqueue_trial(params, user_attrs={"seed": True})
    todo = max(0, settings.trials - len(done))

    def objective(trial: Any) -> tuple[float, float]:
        start = time.perf_counter()
        spec = space.suggest(trial)
        scores = scorer.score(resolve(spec, bank, space.n_layers))
        trial.set_user_attr("spec", spec.to_json())
        trial.set_user_attr("refusal_logodds", scores.refusal_logodds)
        trial.set_user_attr("seconds", time.perf_counter() - start)
        return scores.refusal, scores.kl

    if todo:
        with progress() as bar:
            task = bar.add_task("search", total=todo)

            def advance(_study: Any, trial: Any) -> None:
                values = trial.values or [math.nan, math.nan]
                bar.update(task, advance=1, description=f"search (last: refusal {values[0]:.3f}, KL {values[1]:.4f})")

            study.optimize(objective, n_trials=todo, callbacks=[advance], catch=(RefusalEditError,))
    return [_trial_record(t) for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


def to_confirm(
    trials: Sequence[dict[str, Any]], base_refusal: float, settings: TuneSettings, kl_cap: float | None = None
) -> list[dict[str, Any]]:
    """Up to `settings.confirm` proxy-front trials with low refusal and no more KL than `kl_cap` (the paper's
    edit: a point that damages more than it is not worth confirming), spread along the KL axis."""
    front = pareto(trials, lambda t: (t["refusal_proxy"], t["kl_proxy"]))
    if kl_cap is not None:
        front = [t for t in front if t["kl_proxy"] < kl_cap] or front
    low = [t for t in front if t["refusal_proxy"] <= settings.low_refusal * base_refusal]
    if not low:  # nothing lowers refusal that much: confirm the lowest-refusal end of the front
        low = sorted(front, key=lambda t: t["refusal_proxy"])[: settings.confirm]
    return spread(low, settings.confirm, key=lambda t: math.log(max(t["kl_proxy"], 1e-6)))


def tune(
    scorer: ProxyScorer,
    confirmer: Confirmer,
    bank: DirectionBank,
    n_layers: int,
    settings: TuneSettings,
    storage: Path,
    resume: bool = False,
    on_confirmed: Callable[[dict[str, Any]], None] | None = None,
) -> TuneResult:
    """Search, confirm and pick (module docstring); `storage` is the study journal file."""
    timings: dict[str, float] = {}
    space = SearchSpace(
        n_layers=n_layers,
        direction_layer=bank.layer,
        per_layer=bank.mean_diff is not None,
        harmless_means=bank.harmless_mean is not None,
        preserve_norm=settings.preserve_norm,
    )
    start = time.perf_counter()
    trials = search(scorer, space, bank, settings, storage, resume)
    timings["search_s"] = time.perf_counter() - start
    if not trials:
        raise RefusalEditError("no trial completed")
    paper = EditSpec().to_json()
    reference = next((t for t in trials if t["spec"] == paper), None)
    kl_cap = reference["kl_proxy"] if reference is not None else None
    chosen_trials = to_confirm(trials, scorer.base.refusal, settings, kl_cap)
    if reference is not None and reference not in chosen_trials:
        chosen_trials = [reference, *chosen_trials]
    start = time.perf_counter()
    specs = [EditSpec.from_json(t["spec"]) for t in chosen_trials]
    measured = confirmer.measure(
        [("base", None)]
        + [(f"trial {t['number']}", resolve(sp, bank, n_layers)) for t, sp in zip(chosen_trials, specs, strict=True)]
    )
    base = {
        "refusal_proxy": scorer.base.refusal,
        "refusal_logodds": scorer.base.refusal_logodds,
        "confirmed": measured[0].to_json(),
    }
    confirmed: list[dict[str, Any]] = []
    for t, spec, m in zip(chosen_trials, specs, measured[1:], strict=True):
        point = {
            "id": f"t{t['number']}",
            "trial": t["number"],
            "spec": t["spec"],
            "describe": spec.describe(),
            "reference": t is reference,
            "proxy": {"refusal": t["refusal_proxy"], "kl": t["kl_proxy"]},
            "confirmed": m.to_json(),
        }
        confirmed.append(point)
        if on_confirmed is not None:
            on_confirmed(point)
    timings["confirm_s"] = time.perf_counter() - start
    picked = pick(confirmed, settings.max_kl)
    err.print(f"picked: {picked.rule}")
    return TuneResult(
        trials=trials,
        confirmed=confirmed,
        base=base,
        chosen=None if picked.index is None else confirmed[picked.index]["id"],
        rule=picked.rule,
        within_max_kl=picked.within_max_kl,
        settings=asdict(settings),
        timings=timings,
    )
