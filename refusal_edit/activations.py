"""Residual-stream activations at the post-instruction positions, accumulated as float64 means.

A forward pre-hook on every decoder layer (and on the final norm) reads the residual stream entering it
at the last `n_positions` tokens. Rows can be kept or dropped per prompt by a predicate on the last
position's logits (the paper keeps harmful prompts the model refuses and harmless ones it answers);
the unfiltered mean is accumulated at the same time so nothing has to run twice.

Each hook copies its slice to the CPU in float64 at once, whatever device accelerate put that layer on
(GPU, CPU, or disk-offloaded and run on the main device), so the sums never depend on the placement; only
the batch in flight is held, never per-prompt activations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from refusal_edit.anatomy import anatomy
from refusal_edit.errors import RefusalEditError
from refusal_edit.forward import BatchView, PromptBatch


@dataclass
class MeanActivations:
    """Sums and counts of activations [n_positions, n_layers + 1, hidden] (entry L = after the last layer)."""

    sum_all: torch.Tensor
    count_all: int
    sum_kept: torch.Tensor
    count_kept: int
    scores: torch.Tensor  # per-prompt value of the keep predicate's input (refusal score)
    # The same sums over the even-numbered and the odd-numbered prompts (`tuning.crossfit`'s two halves), so that
    # cross-fitting needs no pass of its own.
    halves: tuple[MeanActivations, MeanActivations] | None = None

    def mean(self, filtered: bool = True) -> torch.Tensor:
        if filtered and self.count_kept:
            return self.sum_kept / self.count_kept
        return self.sum_all / self.count_all


def mean_activations(
    model,
    batch: PromptBatch,
    n_positions: int,
    score: Callable[[torch.Tensor], torch.Tensor],
    keep: Callable[[torch.Tensor], torch.Tensor],
    description: str = "activations",
) -> MeanActivations:
    """Run `batch` once; accumulate activations of all rows and of rows where `keep(score(logits))`."""
    anat = anatomy(model)
    n_layers = anat.num_layers
    captured: list[torch.Tensor | None] = [None] * (n_layers + 1)

    def make_hook(i: int):
        def hook(_m, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            captured[i] = h[:, -n_positions:, :].detach().to("cpu", torch.float64)

        return hook

    modules = [*anat.layers, anat.final_norm]
    handles = [m.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, m in enumerate(modules)]
    shape = (n_positions, n_layers + 1, anat.hidden_size)
    sum_all = torch.zeros(shape, dtype=torch.float64)
    sum_kept = torch.zeros(shape, dtype=torch.float64)
    counts = {"all": 0, "kept": 0}
    half_sums = torch.zeros((2, 2, *shape), dtype=torch.float64)  # [half, all / kept, ...]
    half_counts = torch.zeros((2, 2), dtype=torch.long)

    def on_batch(view: BatchView, logits: torch.Tensor) -> None:
        acts = torch.stack(captured, dim=2)  # [B, pos, layer, H]
        if not torch.isfinite(acts).all():
            bad = (~torch.isfinite(acts)).nonzero()[0].tolist()
            raise RefusalEditError(f"non-finite activations at layer {bad[2]} (dtype overflow? try `dtype` float32)")
        mask = keep(score(logits)).cpu()
        sum_all.add_(acts.sum(0))
        sum_kept.add_(acts[mask].sum(0))
        counts["all"] += acts.shape[0]
        counts["kept"] += int(mask.sum())
        odd = torch.tensor([i % 2 for i in view.rows], dtype=torch.bool)
        for half, rows in enumerate((~odd, odd)):
            half_sums[half, 0].add_(acts[rows].sum(0))
            half_sums[half, 1].add_(acts[rows & mask].sum(0))
            half_counts[half, 0] += int(rows.sum())
            half_counts[half, 1] += int((rows & mask).sum())

    try:
        scores = batch.run(model, on_batch=on_batch, description=description, reduce=score)
    finally:
        for h in handles:
            h.remove()
    scores = scores.double()
    halves = tuple(
        MeanActivations(half_sums[h, 0], int(half_counts[h, 0]), half_sums[h, 1], int(half_counts[h, 1]), scores[h::2])
        for h in (0, 1)
    )
    return MeanActivations(sum_all, counts["all"], sum_kept, counts["kept"], scores, halves)  # type: ignore[arg-type]
