"""Select the refusal direction among the candidates, by the paper's criteria on validation prompts.

For a candidate r at (position, layer):
- bypass: mean refusal score on harmful val prompts with r ablated from every residual writer;
- induce: mean refusal score on harmless val prompts with the raw vector added at its layer's input;
- kl: mean KL(base || ablated) of the last-position distribution on harmless val prompts.
Candidates with NaN scores, in the last `prune_layer_fraction` of layers, with kl > `kl_threshold` or
induce < `induce_threshold` are discarded; the lowest bypass wins.

`exhaustive` scores every candidate on full sequences (the reference, as in the paper's code).
`fast` (the default) ranks candidates by a proxy computed from a single forward and backward pass,
evaluates only the best few in full, and reuses the shared chat-template prefix (see `proxy`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from refusal_edit.console import track
from refusal_edit.directions.attribution import attribution_bypass
from refusal_edit.directions.candidates import CandidateSet
from refusal_edit.errors import RefusalEditError
from refusal_edit.forward import PromptBatch
from refusal_edit.interventions import ablation, addition
from refusal_edit.judging.scores import kl_divergence, refusal_scores
from refusal_edit.packed import packed_or_padded


@dataclass
class SelectionSettings:
    """The paper's filters (defaults are its values) and how much of the fast path to score exactly."""

    kl_threshold: float = 0.1
    induce_threshold: float = 0.0
    prune_layer_fraction: float = 0.2
    top_k: int = 8
    batch_size: int = 32
    strict: bool = False  # no candidate passes: fail (the paper's code) instead of relaxing by `relax`

    @classmethod
    def merged(cls, *layers: dict[str, Any] | None) -> SelectionSettings:
        """Defaults, overridden by each mapping in turn (recipe, then command line); None values skip."""
        values: dict[str, Any] = {}
        names = {f for f in cls.__dataclass_fields__}
        for layer in layers:
            for key, value in (layer or {}).items():
                if value is not None and key in names:
                    values[key] = value
        return cls(**values)

    def check(self) -> None:
        """Values the filters cannot work with are errors naming the parameter (never silently clamped)."""
        if not 0.0 <= self.prune_layer_fraction < 1.0:
            raise RefusalEditError(
                f"`prune_layer_fraction` must be a fraction in [0, 1), got {self.prune_layer_fraction:g} "
                "(the last fraction of layers whose candidates are discarded)"
            )
        for name in ("kl_threshold", "induce_threshold"):
            if math.isnan(getattr(self, name)):
                raise RefusalEditError(f"`{name}` must be a number, got NaN")
        if self.top_k < 1:
            raise RefusalEditError(f"`top_k` must be at least 1, got {self.top_k}")
        if self.batch_size < 1:
            raise RefusalEditError(f"`batch_size` must be at least 1, got {self.batch_size}")

    def max_layer(self, n_layers: int) -> int:
        """Candidates at layers >= this are discarded (the paper's int(L * (1 - fraction)))."""
        return int(n_layers * (1.0 - self.prune_layer_fraction))


@dataclass
class Candidate:
    position: int  # negative token index, -n .. -1
    layer: int
    bypass: float | None = None
    induce: float | None = None
    kl: float | None = None
    proxy: float | None = None
    discarded: str | None = None  # why it cannot be selected, None if eligible

    @property
    def evaluated(self) -> bool:
        return self.bypass is not None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Selection:
    method: str
    chosen: Candidate
    candidates: list[Candidate]
    base: dict[str, float]
    seconds: float
    evaluated: int
    details: dict[str, Any] = field(default_factory=dict)


class Scorer:
    """Scores candidates on fixed validation batches; base-model numbers are computed once."""

    def __init__(
        self,
        model,
        tokenizer,
        harmful_val: Sequence[str],
        harmless_val: Sequence[str],
        refusal_ids: Sequence[int],
        cands: CandidateSet,
        batch_size: int = 32,
        share_prefix: bool = True,
    ) -> None:
        self.model = model
        self.cands = cands
        self.refusal_ids = list(refusal_ids)
        if share_prefix:  # the fast path: packed prompts (no padding) where this model computes them exactly
            self.harmful, harmful_logits = packed_or_padded(model, tokenizer, harmful_val, batch_size)
            self.harmless, self.base_harmless_logits = packed_or_padded(model, tokenizer, harmless_val, batch_size)
        else:  # the reference: plain padded batches, as in the paper's code
            self.harmful = PromptBatch(tokenizer, harmful_val, batch_size, share_prefix=False)
            self.harmless = PromptBatch(tokenizer, harmless_val, batch_size, share_prefix=False)
            harmful_logits = self.harmful.run(model)
            self.base_harmless_logits = self.harmless.run(model)
        self.base_harmless = float(self._score(self.base_harmless_logits).mean())
        self.base_harmful = float(self._score(harmful_logits).mean())

    def _score(self, logits: torch.Tensor) -> torch.Tensor:
        return refusal_scores(logits, self.refusal_ids)

    def bypass(self, pos: int, layer: int) -> float:
        with ablation(self.model, self.cands.vector(pos, layer)):
            return float(self.harmful.run(self.model, reduce=self._score).mean())

    def kl(self, pos: int, layer: int) -> float:
        with ablation(self.model, self.cands.vector(pos, layer)):
            logits = self.harmless.run(self.model)
        return float(kl_divergence(self.base_harmless_logits, logits).mean())

    def induce(self, pos: int, layer: int) -> float:
        with addition(self.model, self.cands.vector(pos, layer), layer):
            return float(self.harmless.run(self.model, reduce=self._score).mean())

    def degenerate(self, cand: Candidate) -> bool:
        """Candidates that are (numerically) zero, e.g. layer 0 at a fixed template token."""
        v = self.cands.vector(cand.position, cand.layer)
        return not torch.isfinite(v).all() or float(v.norm()) <= 1e-6 * float(self.cands.mean_diff.float().norm())

    def full(self, cand: Candidate) -> Candidate:
        if self.degenerate(cand):
            cand.bypass = cand.kl = cand.induce = math.nan
            return cand
        cand.bypass = self.bypass(cand.position, cand.layer)
        cand.kl = self.kl(cand.position, cand.layer)
        cand.induce = self.induce(cand.position, cand.layer)
        return cand

    def base(self) -> dict[str, float]:
        return {"harmful_refusal_score": self.base_harmful, "harmless_refusal_score": self.base_harmless}


def judge(cand: Candidate, settings: SelectionSettings, n_layers: int) -> Candidate:
    """Set `discarded` by the paper's filters (late layer, NaN, KL, induce); scores not computed yet
    leave the candidate "not evaluated" unless a computed one already rules it out."""
    values = [v for v in (cand.bypass, cand.induce, cand.kl) if v is not None]
    if cand.layer >= settings.max_layer(n_layers):
        cand.discarded = "late layer"
    elif any(math.isnan(v) for v in values):
        cand.discarded = "nan"
    elif cand.kl is not None and cand.kl > settings.kl_threshold:
        cand.discarded = "kl"
    elif cand.induce is not None and cand.induce < settings.induce_threshold:
        cand.discarded = "induce"
    elif len(values) < 3:
        cand.discarded = "not evaluated"
    else:
        cand.discarded = None
    return cand


def pick(cands: list[Candidate], settings: SelectionSettings | None = None) -> Candidate:
    """Lowest bypass among eligible candidates; if none is eligible, say what would admit the best ones
    (never a threshold tighter than the one in force)."""
    eligible = [c for c in cands if c.discarded is None]
    if eligible:
        return min(eligible, key=lambda c: c.bypass)  # type: ignore[arg-type,return-value]
    settings = settings or SelectionSettings()
    reasons: dict[str, int] = {}
    for c in cands:
        reasons[c.discarded or "?"] = reasons.get(c.discarded or "?", 0) + 1
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items()))
    scored = sorted(
        (c for c in cands if c.discarded in ("kl", "induce") and c.bypass is not None and not math.isnan(c.bypass)),
        key=lambda c: c.bypass,  # type: ignore[arg-type,return-value]
    )
    hints = []
    for c in scored[:3]:
        need = []
        if c.kl is not None and c.kl > settings.kl_threshold:
            need.append(f"`kl_threshold` {math.ceil(c.kl * 1000) / 1000:g}")
        if c.induce is not None and c.induce < settings.induce_threshold:
            need.append(f"`induce_threshold` {math.floor(c.induce * 100) / 100:.2f}")
        if need:
            hints.append(f"layer {c.layer} position {c.position} (bypass {c.bypass:.2f}) needs {' '.join(need)}")
    hint = ("; closest: " + "; ".join(hints)) if hints else "; try more prompts"
    raise RefusalEditError(f"every candidate was filtered out ({summary}){hint}")


RELAX_STEPS = 4
RELAX_RULE = (
    "no candidate passed the filters: each step doubles the KL threshold (from at least 0.05) and lowers the "
    f"induce threshold by 0.5, up to {RELAX_STEPS} steps; the first step that admits a candidate picks the lowest "
    "bypass among those it admits; after the last step, the lowest bypass of the scored candidates"
)


def relaxed(settings: SelectionSettings, step: int) -> SelectionSettings:
    """The filters after `step` relaxation steps (`RELAX_RULE`)."""
    return replace(
        settings,
        kl_threshold=max(settings.kl_threshold, 0.05) * 2**step,
        induce_threshold=settings.induce_threshold - 0.5 * step,
    )


def relax(
    scored: list[Candidate], settings: SelectionSettings, n_layers: int, scorer: Scorer | None = None
) -> tuple[Candidate, dict[str, Any]]:
    """Pick among `scored` candidates under ever looser filters (`RELAX_RULE`); what was relaxed, for run.json.
    With a `scorer`, induce scores missing for candidates the looser KL admits are computed."""
    usable = [c for c in scored if c.bypass is not None and not math.isnan(c.bypass) and c.discarded != "late layer"]
    if not usable:
        raise RefusalEditError("no candidate could be scored (every one is late, degenerate or NaN)")
    for step in range(1, RELAX_STEPS + 1):
        loose = relaxed(settings, step)
        for c in sorted(usable, key=lambda c: c.bypass):  # type: ignore[arg-type,return-value]
            if scorer is not None and c.kl is not None and c.kl <= loose.kl_threshold and c.induce is None:
                c.induce = scorer.induce(c.position, c.layer)
            judge(c, loose, n_layers)
        eligible = [c for c in usable if c.discarded is None]
        if eligible:
            chosen = min(eligible, key=lambda c: c.bypass)  # type: ignore[arg-type,return-value]
            to = {"kl_threshold": loose.kl_threshold, "induce_threshold": loose.induce_threshold}
            return chosen, _relaxation(settings, step, to)
    chosen = min(usable, key=lambda c: c.bypass)  # type: ignore[arg-type,return-value]
    chosen.discarded = None
    return chosen, _relaxation(settings, RELAX_STEPS + 1, {"kl_threshold": None, "induce_threshold": None})


def _relaxation(settings: SelectionSettings, steps: int, to: dict[str, float | None]) -> dict[str, Any]:
    return {
        "from": {"kl_threshold": settings.kl_threshold, "induce_threshold": settings.induce_threshold},
        "to": to,
        "steps": steps,
        "rule": RELAX_RULE,
    }


def describe_relaxation(relaxation: dict[str, Any]) -> str:
    """One line for the user: what the filters were, what admitted the pick."""
    a, b = relaxation["from"], relaxation["to"]
    before = f"KL <= {a['kl_threshold']:g}, induce >= {a['induce_threshold']:g}"
    if b["kl_threshold"] is None:
        return f"no candidate passed {before} even relaxed {RELAX_STEPS} times: picked the lowest bypass (filters off)"
    return f"no candidate passed {before}: relaxed to KL <= {b['kl_threshold']:g}, induce >= {b['induce_threshold']:g}"


def all_candidates(cands: CandidateSet) -> list[Candidate]:
    return [
        Candidate(-(cands.n_positions - p), layer) for p in range(cands.n_positions) for layer in range(cands.n_layers)
    ]


def select_exhaustive(scorer: Scorer, settings: SelectionSettings) -> Selection:
    """Score every (position, layer) candidate in full: the paper's procedure, used as the reference."""
    start = time.perf_counter()
    cands = all_candidates(scorer.cands)
    for c in track(cands, "scoring all candidates"):
        scorer.full(c)
        judge(c, settings, scorer.cands.n_layers)
    details: dict[str, Any] = {}
    if settings.strict or any(c.discarded is None for c in cands):
        chosen = pick(cands, settings)
    else:
        chosen, details["relaxed"] = relax(cands, settings, scorer.cands.n_layers)
    return Selection("exhaustive", chosen, cands, scorer.base(), time.perf_counter() - start, len(cands), details)


def select_fast(
    scorer: Scorer,
    settings: SelectionSettings,
    tokenizer,
    harmful_val: Sequence[str],
    max_rounds: int = 4,
) -> Selection:
    """Rank candidates by the attribution proxy and score only the best `top_k` exactly (the next `top_k`
    if none of them passes the filters, up to `max_rounds` times)."""
    start = time.perf_counter()
    n_layers = scorer.cands.n_layers
    cands = all_candidates(scorer.cands)
    for c in cands:
        judge(c, settings, n_layers)  # marks late layers now; the rest are "not evaluated" until scored
    pool = [c for c in cands if c.discarded != "late layer" and not scorer.degenerate(c)]
    for c in cands:
        if c.discarded != "late layer" and c not in pool:
            c.discarded = "nan"
    if not pool:
        raise RefusalEditError("no candidate direction left before the late layers")
    vectors = torch.stack([scorer.cands.vector(c.position, c.layer) for c in pool])
    units = torch.nn.functional.normalize(vectors, dim=-1)
    proxy_start = time.perf_counter()
    estimates, _ = attribution_bypass(
        scorer.model, tokenizer, harmful_val, units, scorer.refusal_ids, batch_size=max(1, settings.batch_size // 4)
    )
    proxy_seconds = time.perf_counter() - proxy_start
    for c, e in zip(pool, estimates.tolist(), strict=True):
        c.proxy = e
    ranked = sorted(pool, key=lambda c: c.proxy)  # type: ignore[arg-type,return-value]
    # Exact scores for the best-ranked k: bypass first (one pass each); then KL and induce in order of
    # bypass until one passes the filters - that one is the lowest bypass among the eligible, exactly as
    # if all three scores had been computed for all k.
    evaluated: list[Candidate] = []
    k = max(1, settings.top_k)
    chosen = None
    # Without `strict`, two rounds before relaxing: a first run on a new model should not score every candidate.
    rounds = max_rounds if settings.strict else min(max_rounds, 2)
    for round_ in range(rounds):
        batch = ranked[round_ * k : (round_ + 1) * k]
        if not batch:
            break
        for c in track(batch, f"bypass of the top candidates ({round_ + 1})"):
            c.bypass = scorer.bypass(c.position, c.layer)
            evaluated.append(c)
        by_bypass = sorted(evaluated, key=lambda c: c.bypass)  # type: ignore[arg-type,return-value]
        for c in track(by_bypass, f"KL and induce of the top candidates ({round_ + 1})"):  # a named pass
            if c.kl is None:
                c.kl = scorer.kl(c.position, c.layer)
                if c.kl <= settings.kl_threshold:
                    c.induce = scorer.induce(c.position, c.layer)
            judge(c, settings, n_layers)
            if c.discarded is None:
                chosen = c
                break
        if chosen is not None:
            break
    details: dict[str, Any] = {}
    if chosen is None and settings.strict:  # complete the best few so the error can say what would admit them
        for c in sorted(evaluated, key=lambda c: c.bypass)[:3]:  # type: ignore[arg-type,return-value]
            if c.induce is None:
                c.induce = scorer.induce(c.position, c.layer)
            judge(c, settings, n_layers)
        chosen = pick(evaluated, settings)
    elif chosen is None:
        chosen, details["relaxed"] = relax(evaluated, settings, n_layers, scorer)
    details |= {"proxy_seconds": proxy_seconds, "top_k": k, "proxy_rank_of_chosen": ranked.index(chosen) + 1}
    return Selection("fast", chosen, cands, scorer.base(), time.perf_counter() - start, len(evaluated), details)
