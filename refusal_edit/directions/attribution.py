"""A cheap first-order estimate of every candidate's bypass score (attribution patching).

Ablating r from a writer changes its output o by -(o . u) u (u = r, or normalize(g * r) before a
sandwich norm: `linalg.sandwich_rows`). To first order the refusal score changes by
g . delta = -(g . u)(o . u), where g is the gradient of the score with respect to that writer's output.
Gradients already include every downstream path, so one forward and one backward pass over the harmful
validation prompts give the estimate for *all* candidates at once:

    proxy(r) = base + mean over prompts of  -sum over writers, tokens of (g . u)(o . u)

It ignores interactions between ablations, so it only ranks candidates; the best-ranked few are then
scored exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from refusal_edit.anatomy import anatomy
from refusal_edit.console import track
from refusal_edit.forward import PromptBatch, model_device, positions
from refusal_edit.judging.scores import refusal_scores
from refusal_edit.linalg import sandwich_rows
from refusal_edit.offload import on_disk, reloaded_in_backward


def attribution_bypass(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    directions: torch.Tensor,
    refusal_ids: Sequence[int],
    batch_size: int = 8,
) -> tuple[torch.Tensor, float]:
    """First-order bypass estimates for unit `directions` [C, H]; returns (estimates [C], base score).

    A model with weights offloaded to disk runs one prompt per backward pass: the backward keeps every
    layer's activations of its batch (about 40 MB per prompt and layer at 1.5B scale in float32, 1.2 GB for
    4 prompts over 28 layers), which a memory budget for the weights does not cover. The estimate is a sum
    over prompts either way.
    """
    if on_disk(model):
        batch_size = 1
    device = model_device(model)
    R = directions.float().to(device)
    writers = anatomy(model).writers()
    removed = [sandwich_rows(R, w.gain) for w in writers]  # per writer, [C, H]: what each candidate removes
    batch = PromptBatch(tokenizer, texts, batch_size, share_prefix=False)
    total = torch.zeros(R.shape[0], dtype=torch.float64, device=device)
    base_total = 0.0
    saved: dict[int, torch.Tensor] = {}

    def make_hook(index: int, first: bool):
        def hook(_m, _args, output):
            out = output[0] if isinstance(output, tuple) else output
            if first:  # the graph starts here: parameters stay frozen, activations get gradients
                out = out.detach().requires_grad_(True)
            out.retain_grad()
            saved[index] = out
            if isinstance(output, tuple):
                return (out, *output[1:])
            return out

        return hook

    handles = [w.module.register_forward_hook(make_hook(i, w.layer is None)) for i, w in enumerate(writers)]
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for rows in track(batch.batches, "proxy scores"):
            view = batch.view(rows, device)
            saved.clear()
            with torch.enable_grad(), reloaded_in_backward(model):
                logits = model(
                    input_ids=view.input_ids,
                    attention_mask=view.attention_mask,
                    position_ids=positions(view.attention_mask),
                    logits_to_keep=1,
                ).logits[:, -1, :]
                score = refusal_scores(logits.float(), refusal_ids)
                score.sum().backward()
            base_total += float(score.detach().sum())
            mask = view.attention_mask.unsqueeze(-1).float()
            for i, units in enumerate(removed):
                out = saved[i]
                if units.device != out.device:  # a writer on another GPU: move its candidates there once
                    units = removed[i] = units.to(out.device)
                o = (out.detach().float() * mask.to(out.device)) @ units.T  # [B, T, C]
                g = out.grad.float() @ units.T
                total -= (o * g).sum(dim=(0, 1)).double().to(device)
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(model.parameters(), requires, strict=True):
            p.requires_grad_(r)
    n = len(texts)
    base = base_total / n
    return (base + total / n).cpu(), base
