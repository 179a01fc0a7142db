"""The paper's scores, computed from last-position logits (used by direction selection and evaluation).

refusal score: log-odds that the next token is a refusal token,
    log p(R) - log(1 - p(R)) = logsumexp(logits[R]) - logsumexp(logits[not R]),
computed in float64 so saturated probabilities stay finite.
KL: KL(base || other) of the next-token distributions at the last position.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def refusal_scores(logits: torch.Tensor, refusal_ids: Sequence[int]) -> torch.Tensor:
    """Per-row refusal log-odds, float64 [N]."""
    x = logits.double()
    mask = torch.zeros(x.shape[-1], dtype=torch.bool, device=x.device)
    mask[list(refusal_ids)] = True
    refusal = torch.logsumexp(x[..., mask], dim=-1)
    other = torch.logsumexp(x.masked_fill(mask, float("-inf")), dim=-1)
    return refusal - other


def kl_divergence(base_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-row KL(base || other) in nats, float64 [N]."""
    p_log = torch.log_softmax(base_logits.double(), dim=-1)
    q_log = torch.log_softmax(logits.double(), dim=-1)
    return (p_log.exp() * (p_log - q_log)).sum(-1)
