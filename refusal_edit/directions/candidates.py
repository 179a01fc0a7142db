"""Candidate directions: difference in means at every (post-instruction position, layer)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from refusal_edit.activations import MeanActivations, mean_activations
from refusal_edit.console import console
from refusal_edit.errors import RefusalEditError
from refusal_edit.forward import PromptBatch
from refusal_edit.judging.scores import refusal_scores
from refusal_edit.prompts.template import ChatFormat

MIN_KEPT = 8  # prompts per side the train filter must keep, else the unfiltered means are used


@dataclass
class CandidateSet:
    """mean(harmful) - mean(harmless): [n_positions, n_layers + 1, hidden], float64.

    Position index p in 0..n_positions-1 stands for token -(n_positions - p); layer index l is the
    residual stream entering layer l (l == n_layers: after the last layer).
    """

    mean_diff: torch.Tensor
    harmful: MeanActivations
    harmless: MeanActivations
    filtered: bool
    filter_train: bool = True  # what was asked: `filtered` is whether enough prompts survived to honour it
    min_kept: int = MIN_KEPT  # prompts per side the filter had to keep

    @property
    def n_positions(self) -> int:
        return self.mean_diff.shape[0]

    @property
    def n_layers(self) -> int:
        return self.mean_diff.shape[1] - 1

    def vector(self, pos: int, layer: int) -> torch.Tensor:
        """Raw mean-difference vector (float32) at negative position `pos` and `layer`."""
        return self.mean_diff[self.n_positions + pos, layer].float()

    def half(self, h: int) -> CandidateSet:
        """The candidates of the even-numbered (`h` 0) or odd-numbered (1) prompts of both sides, filtered as
        these were asked to be: what `generate_candidates` makes of those prompts alone, with no pass of its
        own (cross-fitting, `tuning.crossfit`)."""
        if self.harmful.halves is None or self.harmless.halves is None:
            raise RefusalEditError("these candidates were made without their halves' sums")
        harm, safe = self.harmful.halves[h], self.harmless.halves[h]
        return candidate_set(harm, safe, self.filter_train, self.min_kept, quiet=True)


def generate_candidates(
    model,
    tokenizer,
    fmt: ChatFormat,
    harmful: Sequence[str],
    harmless: Sequence[str],
    refusal_ids: Sequence[int],
    batch_size: int = 16,
    filter_train: bool = True,
    min_kept: int = MIN_KEPT,
) -> CandidateSet:
    """Mean activations of harmful and harmless training prompts and their difference.

    With `filter_train` (the paper's default) only harmful prompts the model refuses (refusal score > 0)
    and harmless prompts it answers (score < 0) count; if fewer than `min_kept` survive on either side,
    the unfiltered means are used and that is reported.
    """
    n_pos = fmt.n_positions

    def score(logits: torch.Tensor) -> torch.Tensor:
        return refusal_scores(logits, refusal_ids)

    harm = mean_activations(
        model,
        PromptBatch(tokenizer, fmt.format_all(list(harmful)), batch_size, keep_last=n_pos),
        n_pos,
        score,
        lambda s: s > 0,
        "harmful activations",
    )
    safe = mean_activations(
        model,
        PromptBatch(tokenizer, fmt.format_all(list(harmless)), batch_size, keep_last=n_pos),
        n_pos,
        score,
        lambda s: s < 0,
        "harmless activations",
    )
    return candidate_set(harm, safe, filter_train, min_kept)


def candidate_set(
    harm: MeanActivations, safe: MeanActivations, filter_train: bool, min_kept: int = MIN_KEPT, quiet: bool = False
) -> CandidateSet:
    """The difference in means, filtered when asked and when at least `min_kept` prompts survive on each side."""
    use_filter = filter_train and harm.count_kept >= min_kept and safe.count_kept >= min_kept
    if filter_train and not use_filter and not quiet:
        console.print(
            f"[yellow]train filter kept {harm.count_kept} harmful / {safe.count_kept} harmless prompts "
            f"(< {min_kept}); using unfiltered means[/yellow]"
        )
    diff = harm.mean(use_filter) - safe.mean(use_filter)
    return CandidateSet(diff, harm, safe, use_filter, filter_train, min_kept)
