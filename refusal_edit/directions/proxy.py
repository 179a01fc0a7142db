"""A cheap first-order estimate of every candidate's bypass score (attribution patching).

Ablating r from a writer changes its output o by -(o . u) u (u = r, or normalize(g * r) before a
sandwich norm). To first order the refusal score changes by g . delta = -(g . u)(o . u), where g is the
gradient of the score with respect to that writer's output. Gradients already include every
downstream path, so one forward and one backward pass over the harmful validation prompts give the
estimate for *all* candidates at once:

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
from refusal_edit.directions.scoring import refusal_scores
from refusal_edit.forward import PromptBatch, model_device


def _writers(model: nn.Module) -> list[tuple[nn.Module, torch.Tensor | None, str]]:
    """(module, post-norm gain or None, kind) for every residual writer."""
    anat = anatomy(model)
    out: list[tuple[nn.Module, torch.Tensor | None, str]] = [(e, None, "embedding") for e in anat.embeddings]
    for layer in range(anat.num_layers):
        out.append((anat.attn(layer), anat.post_norm_gain(layer, "attn"), "attn"))
        out.append((anat.mlp(layer), anat.post_norm_gain(layer, "mlp"), "mlp"))
    return out


def attribution_bypass(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    directions: torch.Tensor,
    refusal_ids: Sequence[int],
    batch_size: int = 8,
) -> tuple[torch.Tensor, float]:
    """First-order bypass estimates for unit `directions` [C, H]; returns (estimates [C], base score)."""
    device = model_device(model)
    R = directions.float().to(device)
    writers = _writers(model)
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

    n_embed = sum(1 for _, _, k in writers if k == "embedding")
    handles = [m.register_forward_hook(make_hook(i, i < n_embed)) for i, (m, _, _) in enumerate(writers)]
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for rows in track(batch.batches, "proxy scores"):
            view = batch.view(rows, device)
            saved.clear()
            with torch.enable_grad():
                positions = (view.attention_mask.cumsum(-1) - 1).clamp(min=0)
                logits = model(
                    input_ids=view.input_ids,
                    attention_mask=view.attention_mask,
                    position_ids=positions,
                    logits_to_keep=1,
                ).logits[:, -1, :]
                score = refusal_scores(logits.float(), refusal_ids)
                score.sum().backward()
            base_total += float(score.detach().sum())
            mask = view.attention_mask.unsqueeze(-1).float()
            for i, (_, gain, _) in enumerate(writers):
                out = saved[i]
                units = R if gain is None else torch.nn.functional.normalize(R * gain.to(device), dim=-1)
                o = (out.detach().float() * mask) @ units.T  # [B, T, C]
                g = out.grad.float() @ units.T
                total -= (o * g).sum(dim=(0, 1)).double()
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(model.parameters(), requires, strict=True):
            p.requires_grad_(r)
    n = len(texts)
    base = base_total / n
    return (base + total / n).cpu(), base
