"""Last-position logits of many prompts from packed sequences: no padding at all.

`forward.PromptBatch` left-pads each batch to its longest prompt; on chat prompts of uneven length a third
of the positions it computes are padding. Here the shared chat-template prefix is computed once and every
prompt's suffix is laid end to end in one sequence, with a block-diagonal causal mask (each token sees the
prefix and the earlier tokens of its own prompt) and position ids that restart after the prefix. The model
computes exactly the real tokens, in one large matrix product per layer.

Packing relies on the model honouring a custom 4D mask; a recurrent state would leak across prompts, so
recurrent hybrids never pack, and `packed_or_padded` checks packed logits against padded ones once before
trusting it. Used where the same prompts run many times (tune trials).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from refusal_edit.arch import is_recurrent
from refusal_edit.forward import PromptBatch, cache_kwarg, common_prefix, model_device, output_cache

MAX_TOKENS = 1024  # suffix tokens per packed sequence (the mask is tokens x (prefix + tokens) booleans)
CHECK_TOLERANCE = 1e-3  # packed vs padded logits, relative to the logits' scale


class PackedPrompts:
    """Prompts (token ids) packed after their common prefix, in chunks of at most `max_tokens` suffix tokens."""

    def __init__(self, tokenizer, texts: Sequence[str], max_tokens: int = MAX_TOKENS) -> None:
        if not texts:
            raise ValueError("no prompts")
        self.ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        prefix = common_prefix(self.ids)
        self.prefix = prefix[: max(0, min(len(s) for s in self.ids) - 1)]  # every suffix keeps a token
        p = len(self.prefix)
        self.chunks: list[list[int]] = [[]]
        size = 0
        for i, seq in enumerate(self.ids):
            n = len(seq) - p
            if self.chunks[-1] and size + n > max_tokens:
                self.chunks.append([])
                size = 0
            self.chunks[-1].append(i)
            size += n

    def __len__(self) -> int:
        return len(self.ids)

    @torch.inference_mode()
    def run(self, model: nn.Module, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Last-position logits (float32, original order) of every prompt, or `reduce(logits)` of them."""
        device = model_device(model)
        p = len(self.prefix)
        cache = None
        if p:
            out = model(
                input_ids=torch.tensor([self.prefix], device=device),
                position_ids=torch.arange(p, device=device)[None],
                use_cache=True,
                logits_to_keep=1,
            )
            cache = output_cache(out)
        results: list[torch.Tensor | None] = [None] * len(self.ids)
        for rows in self.chunks:
            segs = [self.ids[i][p:] for i in rows]
            lengths = torch.tensor([len(s) for s in segs])
            n = int(lengths.sum())
            ids = torch.tensor([t for s in segs for t in s], device=device)[None]
            pos = torch.cat([torch.arange(len(s)) for s in segs]) + p
            seg = torch.repeat_interleave(torch.arange(len(segs)), lengths)
            own = (seg[:, None] == seg[None, :]) & (torch.arange(n)[:, None] >= torch.arange(n)[None, :])
            allowed = torch.cat([torch.ones(n, p, dtype=torch.bool), own], dim=1)[None, None]
            # Additive float mask: eager attention adds it to the scores, SDPA accepts it as is.
            dtype = next(model.parameters()).dtype
            mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min).to(device)
            past = None
            if cache is not None:
                import copy

                past = copy.deepcopy(cache)
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos[None].to(device),
                use_cache=past is not None,
                **{cache_kwarg(model): past},
                logits_to_keep=(torch.cumsum(lengths, 0) - 1).to(device),
            )
            logits = out.logits[0].float()
            kept = (logits if reduce is None else reduce(logits)).cpu()
            for j, i in enumerate(rows):
                results[i] = kept[j]
        return torch.stack(results)  # type: ignore[arg-type]


def packed_or_padded(
    model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int
) -> tuple[PackedPrompts | PromptBatch, torch.Tensor]:
    """Packed prompts when this model computes them exactly as padded batches (checked once), else padded; and
    the last-position logits of `texts` from the returned batch (the check computed them: callers need the
    model's own logits anyway, and running the batch again would cost one more pass)."""
    padded = PromptBatch(tokenizer, texts, batch_size)
    if is_recurrent(model.config):
        return padded, padded.run(model)
    try:
        packed = PackedPrompts(tokenizer, texts)
        a = packed.run(model)
    except Exception:  # a model that rejects custom masks or logit indices: the padded path is always right
        return padded, padded.run(model)
    b = padded.run(model)
    scale = float(b.abs().max()) or 1.0
    return (packed, a) if float((a - b).abs().max()) <= CHECK_TOLERANCE * scale else (padded, b)
