"""The batching engine: every batched forward pass of the package goes through here.

Rows are sorted by length into batches, left-padded (so the last position of every row is its last real
token), and given position ids from the attention mask (so padding never shifts absolute positions);
a tokenizer without a pad token pads with EOS (the mask hides it either way).

`PromptBatch` runs chat-formatted prompts for their last-position logits, with the longest common
token prefix (BOS, the default system prompt, the user-turn header) computed once per call - under
whatever hooks are active, so interventions stay exact - and its KV cache reused for every batch.
`teacher_forced` runs prompt + continuation sequences through several models (or one model with and
without hooks) and hands back the logits at the positions that predict the continuation.

Batch size: `auto_batch_size` picks the largest batch whose activations fit in the free memory of the
model's main device (`--batch-size auto`). Every batched loop here (and in `generation`) backs off once on
an out-of-memory error: the failing batch and every later one for that model are cut to half, and it says
so; a second one is an error that names `batch_size`. Models spread over devices by accelerate take their
inputs on their main device (`offload.input_device`); everything else is the same for them.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, TypeVar

import torch
from torch import nn

from refusal_edit.arch import is_recurrent, text_config
from refusal_edit.console import console, track
from refusal_edit.errors import RefusalEditError

T = TypeVar("T")


def pad_id(tokenizer) -> int:
    """The id that fills left padding: the pad token, else EOS, else 0 (the mask hides it)."""
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else (tokenizer.eos_token_id or 0))


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Row indices sorted by length (stable), cut into batches: little padding per batch."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    size = max(1, batch_size)
    return [order[i : i + size] for i in range(0, len(order), size)]


def left_pad(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of `seqs`, left-padded to the longest."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for j, s in enumerate(seqs):
        if s:
            ids[j, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
            mask[j, width - len(s) :] = 1
    return ids, mask


def positions(mask: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Position ids of left-padded rows: 0, 1, ... from each row's first real token (+ `offset`)."""
    return (mask.cumsum(-1) - 1).clamp(min=0) + offset


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
    """Where inputs go: the model's device, or its main device when accelerate spread it over several."""
    from refusal_edit.offload import input_device

    return input_device(model)


BATCH_LIMIT = "_refusal_edit_batch_limit"  # set on a model after an out-of-memory back-off
AUTO_ROWS = 512  # `auto` never batches more rows than this (nor more than there are)


def parse_batch_size(value: int | str) -> int | str:
    """A batch size as given: a whole number (range checks are the settings'), or "auto"."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise RefusalEditError(f"`batch_size` must be a whole number or auto, got {value!r}") from None


def out_of_memory(exc: BaseException) -> bool:
    """An allocation failure on any device (accelerate's test, which also knows the CPU allocator's message)."""
    from accelerate.utils.memory import should_reduce_batch_size

    return isinstance(exc, torch.OutOfMemoryError) or should_reduce_batch_size(exc)  # type: ignore[arg-type]


def back_off(model: Any, rows: int) -> int:
    """After an out-of-memory error on a batch of `rows`: halve the batch for this model, once, and say so."""
    from accelerate.utils.memory import clear_device_cache

    clear_device_cache(garbage_collection=True)
    if getattr(model, BATCH_LIMIT, None) is not None or rows <= 1:
        raise RefusalEditError(
            f"out of memory with {rows} prompt{'s' if rows != 1 else ''} per batch"
            + (" after backing off once" if rows > 1 else "")
            + ": pass a smaller `batch_size`, or run the model with `device` auto and less `max_memory`"
        )
    limit = max(1, rows // 2)
    setattr(model, BATCH_LIMIT, limit)
    console.print(f"[yellow]note:[/yellow] out of memory at {rows} prompts per batch: continuing with {limit}")
    return limit


def run_batches(
    model: Any, batches: Sequence[list[int]], step: Callable[[list[int]], None], description: str | None
) -> None:
    """`step(rows)` for every batch, in order; on out-of-memory the batch is retried cut to the halved size
    (`back_off`), and so are all later ones. The progress bar counts the batches as given."""
    for rows in batches if description is None else track(batches, description):
        pending = [rows]
        while pending:
            part = pending.pop(0)
            limit = getattr(model, BATCH_LIMIT, None)
            if limit is not None and len(part) > limit:
                pending[:0] = [part[i : i + limit] for i in range(0, len(part), limit)]
                continue
            try:
                step(part)
            except Exception as exc:
                if not out_of_memory(exc):
                    raise
                back_off(model, len(part))
                pending.insert(0, part)


def row_bytes(model: nn.Module, tokens: int) -> int:
    """A generous estimate of the memory one row of `tokens` tokens needs in a forward pass: KV cache,
    layer activations (float32 upcasts included), attention scores, last-position logits."""
    cfg = text_config(model.config)
    hidden = int(cfg.hidden_size)
    layers = int(cfg.num_hidden_layers)
    heads = int(getattr(cfg, "num_attention_heads", None) or max(1, hidden // 64))
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
    inter = int(getattr(cfg, "intermediate_size", None) or 4 * hidden)
    vocab = int(getattr(cfg, "vocab_size", None) or 0)
    size = next(model.parameters()).element_size()
    kv = 2 * layers * kv_heads * head_dim * tokens * size
    work = tokens * (6 * hidden + 3 * inter) * 4
    scores = heads * tokens * tokens * 4
    logits = 3 * vocab * 4
    captured = (layers + 1) * 8 * hidden * 8
    return 2 * (kv + work + scores + logits + captured)


def free_bytes(device: torch.device) -> int:
    """Memory activations may use on `device`: 90% of a GPU's free memory; half the available RAM (the
    CPU's weights budget, `max_memory`, is for weights; the rest of the process lives there too)."""
    if device.type == "cuda":
        return int(0.9 * torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(0.5 * psutil.virtual_memory().available)


def auto_batch_size(model: nn.Module, tokenizer, texts: Sequence[str], new_tokens: int = 0) -> int:
    """The largest batch of `texts` (plus `new_tokens` generated per row) that fits, and says which."""
    longest = max((len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts), default=1)
    tokens = longest + new_tokens
    device = model_device(model)
    per_row = row_bytes(model, tokens)
    size = int(max(1, min(len(texts) or 1, AUTO_ROWS, free_bytes(device) // per_row)))
    console.print(
        f"batch size auto: {size} (about {per_row / 2**20:.0f} MiB per row of {tokens} tokens on {device})",
        soft_wrap=True,
    )
    return size


def resolve_batch_size(
    batch_size: int | str, model: nn.Module, tokenizer, texts: Sequence[str], new_tokens: int = 0
) -> int:
    """`batch_size` as a number: itself, or for "auto" `auto_batch_size`."""
    value = parse_batch_size(batch_size)
    return auto_batch_size(model, tokenizer, texts, new_tokens) if value == "auto" else int(value)


def cache_kwarg(model: nn.Module) -> str:
    """`cache` (transformers >= 5.24) or `past_key_values` (earlier releases)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def reusable_prefix(model: nn.Module, prefix: int, longest: int) -> int:
    """How much of a shared `prefix` (tokens) may be computed once and its KV cache reused by every row, for
    sequences up to `longest` tokens: 0 where a sliding window would drop it, or where a layer carries a
    recurrent state (hybrids: a state cannot be copied per row, nor cross left padding)."""
    if is_recurrent(model.config):
        return 0
    window = getattr(text_config(model.config), "sliding_window", None)
    if window and longest > window:
        return 0
    return prefix


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
        self.pad_id = pad_id(tokenizer)
        prefix = common_prefix(self.ids) if share_prefix else []
        # Keep at least `keep_last` tokens (the positions a caller reads) plus one in every suffix.
        cap = max(0, min(len(s) for s in self.ids) - keep_last - 1)
        self.prefix = prefix[:cap]
        self.batch_size = max(1, batch_size)
        self.batches = length_batches([len(s) for s in self.ids], self.batch_size)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_tokens(self) -> int:
        p = len(self.prefix)
        return p + sum(len(s) - p for s in self.ids)

    def prefix_len(self, model: nn.Module) -> int:
        """Length of the prefix to reuse with this model (`reusable_prefix`)."""
        return reusable_prefix(model, len(self.prefix), max(len(s) for s in self.ids))

    def view(self, rows: list[int], device: torch.device, p: int = 0) -> BatchView:
        """Rows as a left-padded batch of the tokens after the first `p` (the reused prefix)."""
        ids, mask = left_pad([self.ids[i][p:] for i in rows], self.pad_id)
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

        def step(rows: list[int]) -> None:
            view = self.view(rows, device, p)
            n = len(rows)
            pos = positions(view.attention_mask, p)
            mask = view.attention_mask
            past = None
            if cache is not None:
                past = copy.deepcopy(cache)
                past.batch_repeat_interleave(n)
                mask = torch.cat([torch.ones((n, p), dtype=mask.dtype, device=device), mask], dim=1)
            out = model(
                input_ids=view.input_ids,
                attention_mask=mask,
                position_ids=pos,
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

        run_batches(model, self.batches, step, description)
        return torch.stack(results)  # type: ignore[arg-type]


@torch.inference_mode()
def tail_logits(model: nn.Module, view: BatchView, keep: int) -> torch.Tensor:
    """float32 logits of the last `keep` positions of a left-padded batch (no KV cache)."""
    device = model_device(model)
    mask = view.attention_mask.to(device)
    out = model(
        input_ids=view.input_ids.to(device),
        attention_mask=mask,
        position_ids=positions(mask),
        use_cache=False,
        logits_to_keep=keep,
    )
    return out.logits[:, -keep:, :].float()


def teacher_forced(
    tokenizer,
    texts: Sequence[str],
    continuations: Sequence[Sequence[int]],
    forwards: Sequence[Callable[[BatchView, int], torch.Tensor]],
    reduce: Callable[[list[torch.Tensor], torch.Tensor], T],
    batch_size: int = 16,
    description: str | None = None,
    model: nn.Module | None = None,
) -> list[T]:
    """`reduce(logits, targets)` per prompt, in the original order, for each `prompt + continuation`.

    Each of `forwards(view, keep)` returns [batch, keep, vocab] logits (e.g. `tail_logits` of a model,
    or of the same model under hooks). Rows are left-padded, so every row ends at the last column: the
    positions that predict a k-token continuation are the k columns before the last one, the first of
    them the last prompt token, and only `max k + 1` columns of logits are kept. `reduce` gets, per
    forward, the [k, vocab] logits of those positions ([1, vocab]: the last prompt position, for an
    empty continuation) and the k target tokens. `model` (the one the forwards run, if one) carries an
    out-of-memory back-off over to later calls.
    """
    if len(texts) != len(continuations):
        raise ValueError("one continuation per prompt")
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    seqs = [list(p) + list(c) for p, c in zip(prompts, continuations, strict=True)]
    pad = pad_id(tokenizer)
    out: list[T | None] = [None] * len(seqs)
    batches = length_batches([len(s) for s in seqs], batch_size)

    def step(rows: list[int]) -> None:
        ids, mask = left_pad([seqs[i] for i in rows], pad)
        view = BatchView(rows, ids, mask)
        keep = max(len(continuations[i]) for i in rows) + 1
        logits = [forward(view, keep) for forward in forwards]
        for j, i in enumerate(rows):
            k = len(continuations[i])
            lo = keep - 1 - k
            rows_k = slice(lo, lo + max(k, 1))
            targets = torch.tensor(list(continuations[i]), dtype=torch.long)
            out[i] = reduce([lg[j, rows_k].to(logits[0].device) for lg in logits], targets)
        del logits

    run_batches(model if model is not None else SimpleNamespace(), batches, step, description)
    return out  # type: ignore[return-value]
