"""Batched forward passes over chat-formatted prompts, with the shared template prefix computed once.

Every prompt formatted with the same chat template starts with the same tokens (BOS, the default system
prompt, the user-turn header). `PromptBatch` splits that longest common token prefix off, runs it once
per call (under whatever hooks are active, so interventions stay exact), and reuses its KV cache for
every batch. Suffixes are left-padded so that the last position of every row is the last real token;
position ids are derived from the mask, so left padding never shifts absolute positions.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from refusal_edit.console import track


def common_prefix(seqs: Sequence[Sequence[int]]) -> list[int]:
    if not seqs:
        return []
    first = seqs[0]
    n = min(len(s) for s in seqs)
    i = 0
    while i < n and all(s[i] == first[i] for s in seqs):
        i += 1
    return list(first[:i])


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def cache_kwarg(model: nn.Module) -> str:
    """`cache` (transformers >= 5.24) or `past_key_values` (earlier releases)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


@dataclass
class BatchView:
    """One batch: `rows` are indices into the original prompt order."""

    rows: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


class PromptBatch:
    """Tokenized prompts ready for repeated forward passes (one per candidate direction)."""

    def __init__(
        self,
        tokenizer,
        texts: Sequence[str],
        batch_size: int = 16,
        share_prefix: bool = True,
        keep_last: int = 1,
    ) -> None:
        if not texts:
            raise ValueError("no prompts")
        self.ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (tokenizer.eos_token_id or 0))
        prefix = common_prefix(self.ids) if share_prefix else []
        # Keep at least `keep_last` tokens (the positions a caller reads) plus one in every suffix.
        cap = max(0, min(len(s) for s in self.ids) - keep_last - 1)
        self.prefix = prefix[:cap]
        self.batch_size = max(1, batch_size)
        order = sorted(range(len(self.ids)), key=lambda i: len(self.ids[i]))
        self.batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_tokens(self) -> int:
        p = len(self.prefix)
        return p + sum(len(s) - p for s in self.ids)

    def prefix_len(self, model: nn.Module) -> int:
        """Length of the prefix to reuse with this model (0 where a sliding window would drop it)."""
        from refusal_edit.arch import text_config

        window = getattr(text_config(model.config), "sliding_window", None)
        if window and max(len(s) for s in self.ids) > window:
            return 0
        return len(self.prefix)

    def view(self, rows: list[int], device: torch.device, p: int = 0) -> BatchView:
        """Rows as a left-padded batch of the tokens after the first `p` (the reused prefix)."""
        suffixes = [self.ids[i][p:] for i in rows]
        width = max(len(s) for s in suffixes)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, s in enumerate(suffixes):
            ids[j, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[j, width - len(s) :] = 1
        return BatchView(rows, ids.to(device), mask.to(device))

    @torch.inference_mode()
    def run(
        self,
        model: nn.Module,
        on_batch: Callable[[BatchView, torch.Tensor], None] | None = None,
        description: str | None = None,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Last-position logits (float32, original order) for every prompt, or `reduce(logits)` of them.

        `on_batch(view, logits)` is called after each batch, e.g. to read activations captured by hooks.
        `reduce` maps a batch of logits to per-row values (a refusal score) so large vocabularies are
        not kept for every prompt.
        """
        device = model_device(model)
        p = self.prefix_len(model)
        cache = None
        if p:
            prefix_ids = torch.tensor([self.prefix], dtype=torch.long, device=device)
            out = model(
                input_ids=prefix_ids,
                position_ids=torch.arange(p, device=device)[None],
                use_cache=True,
                logits_to_keep=1,
            )
            cache = output_cache(out)
        results: list[torch.Tensor | None] = [None] * len(self.ids)
        batches = self.batches if description is None else track(self.batches, description)
        for rows in batches:
            view = self.view(rows, device, p)
            n = len(rows)
            positions = (view.attention_mask.cumsum(-1) - 1).clamp(min=0) + p
            mask = view.attention_mask
            past = None
            if cache is not None:
                past = copy.deepcopy(cache)
                past.batch_repeat_interleave(n)
                mask = torch.cat([torch.ones((n, p), dtype=mask.dtype, device=device), mask], dim=1)
            out = model(
                input_ids=view.input_ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=past is not None,
                **{cache_kwarg(model): past},
                logits_to_keep=1,
            )
            logits = out.logits[:, -1, :].float()
            if on_batch is not None:
                on_batch(view, logits)
            kept = (logits if reduce is None else reduce(logits)).cpu()
            for j, i in enumerate(rows):
                results[i] = kept[j]
        return torch.stack(results)  # type: ignore[arg-type]
