"""`tune`: search the edit variants for the refusal-vs-damage front, then confirm the best points.

1. Search: an Optuna multi-objective study (TPE) over `SearchSpace`; every trial is the edit applied in
   memory (hooks, or in-place weights for norm preservation - nothing is written), scored by the two
   proxies of `proxies`. Its last `refine` trials first bridge the lowest-refusal front point that damages
   less than the paper's edit to the paper's edit (`BRIDGE_STEPS` of the way; a per-layer shape keeps the
   selected direction upstream of its layer, `DOWNSTREAM_BRIDGE_STEPS`), then sweep the lowest-refusal
   front points down in strength (`REFINE_FACTORS`), and last add the bridge's *KL-matched* point: the step
   where the bridge's first-token KL proxy, interpolated between its measured steps, reaches the paper's
   edit's (`matched_step`) - the strongest bridge point that still damages no more than the paper's edit.
   The KL proxy ranks points well where the refusal proxy does not, so this step is computed, not guessed.
   The bridge is there because the refusal proxy misranks points near the paper's edit (on the demo model
   t9's first-token refusal probability is 0.075, the paper's edit's 0.083, yet t9 refuses 2.5 % of the
   harmful train prompts and the paper's edit 1.2 %): the sampler cannot see what buys the last refusals, so
   the points between a proven low-damage shape and the paper's edit are built rather than searched. The
   sweep is there because a few dozen trials leave TPE little room at the low-damage end, and a good shape at
   a lower strength is usually a good low-damage point. The study lives in a journal file, so an interrupted
   or finished study resumes.
2. Confirm: the paper's edit (for reference), the bridge points with no more KL proxy than the paper's edit
   and its KL-matched point (their refusal proxies cannot rank them, see above), up to `confirm` points
   spread along the low-refusal part of the proxy front, and a point the pick names, are measured by greedy
   generation on the val prompts and teacher-forced KL (`confirm`).
3. Resolve: the points that could be picked (`pick.to_resolve`: the lowest val rate and the least damaging of
   the points not told apart from it) are judged again on the cross-fitted train prompts (`crossfit`: more
   prompts, none of them fitted to), round after round until no unjudged point would beat the pick.
4. Pick: the rule of `pick` (`PickRule`) among the confirmed points.
Only confirmed points are offered; `front.json` keeps every trial too.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from refusal_edit.console import progress
from refusal_edit.edits.spec import DirectionBank, EditSpec
from refusal_edit.errors import RefusalEditError, check_at_least
from refusal_edit.tuning.confirm import Confirmer
from refusal_edit.tuning.crossfit import CrossFit
from refusal_edit.tuning.front import pareto, spread
from refusal_edit.tuning.pick import PickRule, pick, to_resolve
from refusal_edit.tuning.proxies import ProxyScorer
from refusal_edit.tuning.space import BRIDGE_DIRECTION, SearchSpace

STUDY = "study.journal"
REFINE_FACTORS = (0.8, 0.6)  # strengths of the refinement sweep, as fractions of the swept point's weights
# Bridge points, as fractions of the way from the strongest low-damage shape to the paper's edit. On the demo
# model the shape (t9) refuses 2.5 % of 240 harmful train prompts at 0.66 / 0.31 of the paper's first-token /
# multi-token KL, the paper's edit 1.2 %; its MLP writers at 0.5 instead of 0.15 refuse 1.2 % at 0.96 / 0.52
# (bench/confirm.py, --split train).
BRIDGE_STEPS = (0.4, 0.7)
# A per-layer shape is bridged with the selected direction upstream of its layer (direction `downstream`), from
# the shape itself on: judged fairly (bench/confirm.py --cross-fit: candidates from one half of the 240 harmful
# train prompts, judged on the other), each layer's own candidate upstream generalises worse - t26's weights
# refuse 5 of 240 with it, 3 downstream-only as the paper's edit does, at 0.88 / 0.53 of its KLs; the shape
# itself (t9) goes from 0.127 to 0.093 first-token KL that way.
DOWNSTREAM_BRIDGE_STEPS = (0.0, 0.4, 0.7)
# A study's user attribute: the bridge's ends, so that its KL-matched point is built after its steps ran.
BRIDGE_PLAN = "bridge_plan"
# A KL-matched step closer than this to a measured step or to the end (the paper's weights) adds nothing: the
# slot goes to the sampler instead.
MATCH_MIN_GAP = 0.05


@dataclass
class TuneSettings:
    trials: int = 32  # Optuna trials in all (seeds included); a resumed study runs up to this many
    confirm: int = 4  # front points confirmed by generation (plus the paper's edit for reference)
    pick: PickRule = field(default_factory=PickRule)  # which confirmed point front.json names
    # Points judged again on the cross-fitted train prompts per round (0: none; the pick then rests on val).
    resolve: int = 3
    # Held-out harmful prompts they are judged on (None: every train prompt), the ones the base model refuses
    # most; and the reply length there (refusals show in the first tokens; every token of every reply costs).
    resolve_prompts: int | None = 96
    resolve_tokens: int = 32
    search_prompts: int = 16  # per side in the search: the most-refused harmful val prompts, harmless val prompts
    max_new_tokens: int = 48  # confirmation: greedy reply length, and the continuation length of the KL
    batch_size: int = 32
    seed: int = 0
    startup: int = 6  # random trials after the seeds before TPE takes over
    preserve_norm: bool = True  # search norm preservation too (in-place weight edits per trial)
    # Confirm only points whose refusal proxy is at most this fraction of the base's: high enough to keep the
    # front's low-damage end (on the demo model its best points keep ~60 %: 0.38 of the base's 0.62).
    low_refusal: float = 0.75
    refine: int = 6  # the study's last trials (at most a quarter): lowest-refusal front points, weaker

    def check(self) -> TuneSettings:
        check_at_least(
            1,
            trials=self.trials,
            confirm=self.confirm,
            max_new_tokens=self.max_new_tokens,
            search_prompts=self.search_prompts,
            batch_size=self.batch_size,
        )
        check_at_least(0, refine=self.refine, resolve=self.resolve)
        check_at_least(1, resolve_tokens=self.resolve_tokens)
        if self.resolve_prompts is not None:
            check_at_least(2, resolve_prompts=self.resolve_prompts)
        trial = self.pick.trial
        if trial is not None and trial >= self.trials:
            raise RefusalEditError(f"pick {self.pick.point}: the study has trials t0 to t{self.trials - 1}")
        return self

    @property
    def refine_trials(self) -> int:
        """The refinement sweep's share of the trials: `refine`, at most a quarter of them."""
        return min(self.refine, self.trials // 4)


@dataclass
class TuneResult:
    trials: list[dict[str, Any]]
    confirmed: list[dict[str, Any]]
    base: dict[str, Any]
    chosen: str | None
    rule: str
    within_max_kl: bool
    pick: dict[str, Any]  # the rule (kind, max_kl, point) and every point's verdict
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
        "refine": t.user_attrs.get("refine", False),
        "bridge": t.user_attrs.get("bridge", False),
        "bridge_step": t.user_attrs.get("bridge_step"),
        "matched": t.user_attrs.get("matched", False),
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
    study = _study(storage, settings, resume, seeds=len(space.seeds()))
    if not study.trials:
        for params in space.seeds():
            study.enqueue_trial(params, user_attrs={"seed": True})

    def objective(trial: Any) -> tuple[float, float]:
        start = time.perf_counter()
        spec = space.suggest(trial)
        scores = scorer.score(spec, bank)
        trial.set_user_attr("spec", spec.to_json())
        trial.set_user_attr("refusal_logodds", scores.refusal_logodds)
        trial.set_user_attr("seconds", time.perf_counter() - start)
        return scores.refusal, scores.kl

    main = settings.trials - settings.refine_trials
    todo = max(0, settings.trials - len(_completed(study)))
    if todo:
        with progress() as bar:
            task = bar.add_task("search", total=todo)

            def advance(_study: Any, trial: Any) -> None:
                values = trial.values or [math.nan, math.nan]
                bar.update(task, advance=1, description=f"search (last: refusal {values[0]:.3f}, KL {values[1]:.4f})")

            def run(until: int) -> None:
                n = until - len(_completed(study))
                if n > 0:
                    study.optimize(objective, n_trials=n, callbacks=[advance], catch=(RefusalEditError,))

            run(main)
            if not any(t.user_attrs.get("refine") for t in study.trials):
                refinements, plan = _refinements(study, space, settings)
                if plan is not None:
                    study.set_user_attr(BRIDGE_PLAN, plan)
                for params, attrs in refinements:
                    study.enqueue_trial(params, user_attrs={"refine": True, **attrs})
            plan = study.user_attrs.get(BRIDGE_PLAN)
            run(settings.trials - (plan is not None))  # the last slot waits for the bridge's measured steps
            if plan is not None and not any(t.user_attrs.get("matched") for t in study.trials):
                matched = _matched(study, space, plan)
                if matched is not None:  # else the sampler takes the slot
                    study.enqueue_trial(matched[0], user_attrs={"refine": True, **matched[1]})
            run(settings.trials)
    return [_trial_record(t) for t in _completed(study)]


def _completed(study: Any) -> list[Any]:
    import optuna

    return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


def _refinements(
    study: Any, space: SearchSpace, settings: TuneSettings
) -> tuple[list[tuple[dict[str, Any], dict]], dict[str, Any] | None]:
    """The refinement trials (module docstring), `settings.refine_trials` (parameters, user attributes) at
    most: the bridge from the proxy front's lowest-refusal point with less KL than the paper's edit to the
    paper's edit (a per-layer shape in its `downstream` form, `DOWNSTREAM_BRIDGE_STEPS`), then the
    lowest-refusal such points at every strength of `REFINE_FACTORS`; and the bridge's plan (its ends, the
    paper's trial) when a slot is left for its KL-matched point (`_matched`), else None."""
    trials = _completed(study)
    records = [_trial_record(t) for t in trials]
    reference = _reference(records)
    front = _front(records, kl_cap=None if reference is None else reference["kl_proxy"])
    by_number = {t.number: t for t in trials}
    shapes = sorted((r for r in front if r is not reference), key=lambda r: r["refusal_proxy"])
    out: list[tuple[dict[str, Any], dict]] = []
    plan = None
    slots = settings.refine_trials
    if shapes and reference is not None:
        start, end = by_number[shapes[0]["number"]].params, by_number[reference["number"]].params
        steps, attrs = BRIDGE_STEPS, {"bridge": True}
        if start.get("direction") == "layer":
            steps, attrs = DOWNSTREAM_BRIDGE_STEPS, {"bridge": True, BRIDGE_DIRECTION: "downstream"}
        out += [(space.between(start, end, t), attrs | {"bridge_step": t}) for t in steps[:slots]]
        if slots > len(steps):
            plan = {
                "start": start,
                "end": end,
                "attrs": attrs,
                "start_trial": shapes[0]["number"],
                "reference_trial": reference["number"],
            }
            slots -= 1
    weaker = [
        (space.scaled(by_number[r["number"]].params, f), {"bridge": False}) for r in shapes for f in REFINE_FACTORS
    ]
    return (out + weaker)[:slots], plan


def _matched(study: Any, space: SearchSpace, plan: dict[str, Any]) -> tuple[dict[str, Any], dict] | None:
    """The bridge's KL-matched point (parameters, user attributes) from its measured steps, or None."""
    done = _completed(study)
    kl = {t.number: t.values[1] for t in done}
    points = {t.user_attrs["bridge_step"]: kl[t.number] for t in done if "bridge_step" in t.user_attrs}
    if 0.0 not in points and plan["start_trial"] in kl:  # the shape itself is the bridge's step 0
        points[0.0] = kl[plan["start_trial"]]
    target = kl.get(plan["reference_trial"])
    step = None if target is None else matched_step(sorted(points.items()), target)
    if step is None:
        return None
    attrs = plan["attrs"] | {"bridge_step": step, "matched": True}
    return space.between(plan["start"], plan["end"], step), attrs


def matched_step(points: Sequence[tuple[float, float]], target: float) -> float | None:
    """The bridge step whose KL reaches `target`, linearly interpolated between the measured (step, KL) points
    (sorted by step): the first crossing, or beyond the last step along the last two points' line (at most
    the whole way, 1). None when the first step already damages more, the KL does not rise towards the end,
    or the step is within `MATCH_MIN_GAP` of a measured one or of the end (the paper's weights): it would
    add nothing."""
    if not points or points[0][1] > target:
        return None
    pairs = list(itertools.pairwise(points))
    crossing = next(((a, b) for a, b in pairs if a[1] <= target < b[1]), None)
    if crossing is None:  # every measured step damages less: extrapolate from the last two
        if not pairs or pairs[-1][1][1] <= pairs[-1][0][1]:
            return None
        crossing = pairs[-1]
    (s0, k0), (s1, k1) = crossing
    step = min(1.0, s0 + (s1 - s0) * (target - k0) / (k1 - k0))
    if min(abs(step - s) for s in [*(s for s, _ in points), 1.0]) < MATCH_MIN_GAP:
        return None
    return round(step, 3)


def _reference(records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The trial of the paper's edit (the first seed), when the study has it."""
    paper = EditSpec().to_json()
    return next((r for r in records if r["spec"] == paper), None)


def _front(records: Sequence[dict[str, Any]], kl_cap: float | None) -> list[dict[str, Any]]:
    """The proxy front, without points that damage more than the paper's edit (`kl_cap`) when any is left."""
    front = pareto(records, lambda t: (t["refusal_proxy"], t["kl_proxy"]))
    if kl_cap is not None:
        front = [t for t in front if t["kl_proxy"] < kl_cap] or front
    return front


def to_confirm(
    trials: Sequence[dict[str, Any]], base_refusal: float, settings: TuneSettings, kl_cap: float | None = None
) -> list[dict[str, Any]]:
    """Up to `settings.confirm` proxy-front trials with low refusal and no more KL than `kl_cap` (the paper's
    edit: a point that damages more than it is not worth confirming), spread along the KL axis."""
    front = _front(trials, kl_cap)
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
    crossfit: Callable[[], CrossFit] | None = None,
) -> TuneResult:
    """Search, confirm, resolve and pick (module docstring); `storage` is the study journal file, `crossfit`
    makes the cross-fitted judge when a point needs it (None: the pick rests on the val prompts)."""
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
    chosen_trials = _to_measure(trials, scorer.base.refusal, settings)
    start = time.perf_counter()
    specs = [EditSpec.from_json(t["spec"]) for t in chosen_trials]
    measured = confirmer.measure(
        [("base", None)] + [(f"trial {t['number']}", sp) for t, sp in zip(chosen_trials, specs, strict=True)], bank
    )
    base = {
        "refusal_proxy": scorer.base.refusal,
        "refusal_logodds": scorer.base.refusal_logodds,
        "confirmed": measured[0].to_json(),
    }
    reference = _reference(trials)
    confirmed: list[dict[str, Any]] = []
    for t, spec, m in zip(chosen_trials, specs, measured[1:], strict=True):
        point = {
            "id": f"t{t['number']}",
            "trial": t["number"],
            "spec": t["spec"],
            "describe": spec.describe(),
            "reference": t is reference,
            "bridge": t["bridge"],
            "bridge_step": t["bridge_step"],
            "proxy": {"refusal": t["refusal_proxy"], "kl": t["kl_proxy"]},
            "confirmed": m.to_json(),
            "resolved": None,
        }
        confirmed.append(point)
        if on_confirmed is not None:
            on_confirmed(point)
    timings["confirm_s"] = time.perf_counter() - start
    start = time.perf_counter()
    judge: CrossFit | None = None
    while crossfit is not None and (todo := to_resolve(confirmed, settings.pick, settings.resolve)):
        judge = judge or crossfit()
        numbers = judge.measure([(confirmed[i]["id"], EditSpec.from_json(confirmed[i]["spec"])) for i in todo])
        for i, m in zip(todo, numbers, strict=True):
            confirmed[i]["resolved"] = m
    timings["resolve_s"] = time.perf_counter() - start
    picked = pick(confirmed, settings.pick)
    return TuneResult(
        trials=trials,
        confirmed=confirmed,
        base=base,
        chosen=None if picked.index is None else confirmed[picked.index]["id"],
        rule=picked.rule,
        within_max_kl=picked.within_max_kl,
        pick={**asdict(settings.pick), "verdicts": picked.verdicts},
        settings=asdict(settings),
        timings=timings,
    )


def _to_measure(trials: Sequence[dict[str, Any]], base_refusal: float, settings: TuneSettings) -> list[dict[str, Any]]:
    """The trials confirmation measures: the paper's edit first, the proxy front's (`to_confirm`), the bridge's
    points that damage no more than the paper's edit by the KL proxy (as for the front's points: one that
    damages more is not worth confirming) and its KL-matched point (the bridge at the paper's damage: confirmed
    whichever side of it the interpolation landed; on the demo model 0.19040 against 0.19040), and the trial a
    point pick names."""
    reference = _reference(trials)
    kl_cap = reference["kl_proxy"] if reference is not None else None
    chosen = to_confirm(trials, base_refusal, settings, kl_cap)
    bridge = [
        t
        for t in trials
        if t["bridge"] and t not in chosen and (t["matched"] or kl_cap is None or t["kl_proxy"] <= kl_cap)
    ]
    if reference is not None and reference not in chosen:
        chosen = [reference, *chosen]
    chosen += bridge
    named = settings.pick.trial
    if named is not None and all(t["number"] != named for t in chosen):
        extra = [t for t in trials if t["number"] == named]
        if not extra:
            raise RefusalEditError(f"pick {settings.pick.point}: that trial did not complete")
        chosen += extra
    return chosen
