"""The two cheap objectives of every `tune` trial, measured with the edit applied in memory (nothing written).

- refusal: the mean probability that the first token of the reply to a harmful validation prompt is a
  refusal token (the model's own refusal starts, from extraction) - a smooth stand-in for the refusal rate;
- KL: the mean first-token KL(base || edited) on harmless validation prompts, in nats.
The base model's harmless logits are computed once; both prompt sets reuse their shared chat-template
prefix (see `forward.PromptBatch`), so a trial costs two batched forward passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from refusal_edit.anatomy import anatomy
from refusal_edit.edits.spec import DirectionBank, EditSpec, WriterBases, resolve
from refusal_edit.forward import PromptBatch
from refusal_edit.interventions import applied
from refusal_edit.judging import kl_divergence, refusal_scores
from refusal_edit.packed import packed_or_padded

__all__ = ["ProxyScorer", "ProxyScores", "applied"]


@dataclass
class ProxyScores:
    refusal: float  # mean first-token refusal probability on harmful prompts
    kl: float  # mean first-token KL on harmless prompts (nats)
    refusal_logodds: float  # mean refusal log-odds (the paper's bypass score)


class ProxyScorer:
    """Scores edits on fixed validation batches; the base model's numbers are computed once."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        harmful: Sequence[str],
        harmless: Sequence[str],
        refusal_ids: Sequence[int],
        batch_size: int = 32,
        keep_harmful: int | None = None,
    ) -> None:
        """`keep_harmful`: search on the harmful prompts the base model refuses most (prompts it answers
        anyway carry no signal about an edit's effect on refusal, and every prompt costs a forward pass)."""
        self.model = model
        self.refusal_ids = list(refusal_ids)
        score = self._logodds
        if keep_harmful is not None and keep_harmful < len(harmful):
            base = PromptBatch(tokenizer, harmful, batch_size).run(model, reduce=score)
            top = sorted(torch.argsort(base, descending=True)[:keep_harmful].tolist())
            harmful = [harmful[i] for i in top]
        self.harmful_texts = list(harmful)
        self.n_harmful = len(harmful)
        # One packed pass over both sets per trial (no padding; see `packed`), checked against padded batches.
        self.batch, logits = packed_or_padded(model, tokenizer, [*harmful, *harmless], batch_size)
        self.base_harmless = logits[self.n_harmful :]
        self.base = self._scores(logits, base=True)

    def _logodds(self, logits: torch.Tensor) -> torch.Tensor:
        return refusal_scores(logits, self.refusal_ids)

    def _scores(self, logits: torch.Tensor, base: bool = False) -> ProxyScores:
        logodds = self._logodds(logits[: self.n_harmful])
        kl = 0.0 if base else float(kl_divergence(self.base_harmless, logits[self.n_harmful :]).mean())
        return ProxyScores(float(torch.sigmoid(logodds).mean()), kl, float(logodds.mean()))

    def _measure(self, edit: WriterBases | None) -> ProxyScores:
        with applied(self.model, edit):
            return self._scores(self.batch.run(self.model))

    def score(self, spec: EditSpec, bank: DirectionBank) -> ProxyScores:
        """The proxies of `spec` drawing on `bank`."""
        return self._measure(resolve(spec, bank, anatomy(self.model).num_layers))
