"""Pure metric functions: KL divergences and cross-entropy from logits (refusal judging is `refusal_edit.judging`).

Everything here takes plain lists and tensors (no models), so each number can be checked by hand.

Teacher-forced positions. For a prompt `p_1..p_m` and the base model's greedy continuation `c_1..c_k`
(EOS and anything after it excluded), the sequence `p_1..p_m c_1..c_k` is run through both models. The
logits at position `p_m` predict `c_1`, at `c_j` predict `c_{j+1}`; so the k positions `p_m, c_1, ...,
c_{k-1}` are exactly those that predict a continuation token (the logits at `c_k` predict a token that
is not part of the continuation and are not used). `continuation_metrics` takes the logits of these k
positions in that order:
- first-token KL: KL(base || edited) at `p_m` only (row 0), the number heretic reports;
- multi-token KL: the mean of KL(base || edited) over all k positions, which catches damage that only
  shows after the first token;
- cross-entropy: the mean negative log-likelihood of `c_1..c_k` under each model (nats per token);
  perplexity = exp(cross-entropy).
Per-prompt values are then averaged over prompts (each prompt weighs the same, whatever its length).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from refusal_edit.judging.scores import kl_divergence

# ---------------------------------------------------------------- divergences and loss


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood (nats, float64) of `targets` [T] under `logits` [T, V]."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -logp.gather(-1, targets.long().to(logp.device).unsqueeze(-1)).squeeze(-1)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean NLL of `targets` [T] under `logits` [T, V], in nats per token."""
    if targets.numel() == 0:
        raise ValueError("cross-entropy of an empty target sequence")
    return float(token_nll(logits, targets).mean())


def perplexity(ce: float | None) -> float | None:
    """exp(cross-entropy); None stays None, overflow becomes inf."""
    if ce is None:
        return None
    try:
        return math.exp(ce)
    except OverflowError:
        return math.inf


def mean_kl(base_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over positions of KL(base || edited), logits [T, V]."""
    if base_logits.shape != logits.shape:
        raise ValueError(f"logit shapes differ: {list(base_logits.shape)} vs {list(logits.shape)}")
    return float(kl_divergence(base_logits, logits).mean())


@dataclass
class ContinuationMetrics:
    """Numbers for one prompt; `kl` and the cross-entropies are None when the continuation is empty."""

    first_token_kl: float
    kl: float | None
    base_ce: float | None
    edited_ce: float | None
    tokens: int


def continuation_metrics(
    base_logits: torch.Tensor, edited_logits: torch.Tensor, targets: torch.Tensor
) -> ContinuationMetrics:
    """Per-prompt metrics from the logits at the positions that predict the continuation (module docstring).

    `base_logits`, `edited_logits`: [k, V] with row 0 = last prompt position; `targets`: the k
    continuation tokens. For an empty continuation pass one row (the last prompt position) and no targets:
    only the first-token KL is defined then.
    """
    k = targets.numel()
    if base_logits.shape != edited_logits.shape:
        raise ValueError(f"logit shapes differ: {list(base_logits.shape)} vs {list(edited_logits.shape)}")
    if base_logits.shape[0] != max(k, 1):
        raise ValueError(f"expected {max(k, 1)} logit rows for {k} continuation tokens, got {base_logits.shape[0]}")
    kls = kl_divergence(base_logits, edited_logits)
    first = float(kls[0])
    if k == 0:
        return ContinuationMetrics(first, None, None, None, 0)
    return ContinuationMetrics(
        first,
        float(kls.mean()),
        cross_entropy(base_logits, targets),
        cross_entropy(edited_logits, targets),
        k,
    )


@dataclass
class DivergenceStats:
    """Harmless-prompt divergences, averaged over prompts; None where no prompt had a continuation."""

    first_token_kl: float
    first_token_kl_max: float
    multi_token_kl: float | None
    multi_token_kl_max: float | None
    base_ce: float | None
    edited_ce: float | None
    prompts: int
    scored: int  # prompts with a non-empty base continuation (multi-token KL and cross-entropy)
    skipped_empty: int
    tokens: int

    @property
    def base_ppl(self) -> float | None:
        return perplexity(self.base_ce)

    @property
    def edited_ppl(self) -> float | None:
        return perplexity(self.edited_ce)

    def to_dict(self) -> dict[str, float | int | None]:
        return {
            "first_token_kl": self.first_token_kl,
            "first_token_kl_max": self.first_token_kl_max,
            "multi_token_kl": self.multi_token_kl,
            "multi_token_kl_max": self.multi_token_kl_max,
            "base_ce": self.base_ce,
            "edited_ce": self.edited_ce,
            "base_ppl": self.base_ppl,
            "edited_ppl": self.edited_ppl,
            "prompts": self.prompts,
            "scored": self.scored,
            "skipped_empty": self.skipped_empty,
            "tokens": self.tokens,
        }


def aggregate(rows: Sequence[ContinuationMetrics]) -> DivergenceStats:
    """Average per-prompt metrics over prompts; empty continuations only enter the first-token KL."""
    if not rows:
        raise ValueError("no prompts to aggregate")
    scored = [r for r in rows if r.tokens > 0]
    firsts = [r.first_token_kl for r in rows]

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    kls = [r.kl for r in scored if r.kl is not None]
    return DivergenceStats(
        first_token_kl=sum(firsts) / len(firsts),
        first_token_kl_max=max(firsts),
        multi_token_kl=mean(kls),
        multi_token_kl_max=max(kls) if kls else None,
        base_ce=mean([r.base_ce for r in scored if r.base_ce is not None]),
        edited_ce=mean([r.edited_ce for r in scored if r.edited_ce is not None]),
        prompts=len(rows),
        scored=len(scored),
        skipped_empty=len(rows) - len(scored),
        tokens=sum(r.tokens for r in scored),
    )
