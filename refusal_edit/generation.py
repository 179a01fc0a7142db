"""Greedy generation in batches (the batching engine's left padding and pad-id rule), shared by
refusal-token derivation, evaluation and tune; and one reply streamed as it is generated (chat).

The chat template's shared start (system prompt, role tokens: about half of each prompt's tokens on the demo
model) is computed once per batch - once per row group where rows run under different edits - and its KV
cache copied to every row (`forward.reusable_prefix` says where that is exact); the rows' own tokens follow
it after their left padding, which the attention mask hides and the position ids skip."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

from refusal_edit.forward import (
    cache_kwarg,
    common_prefix,
    left_pad,
    length_batches,
    model_device,
    output_cache,
    pad_id,
    reusable_prefix,
    run_batches,
)


@dataclass
class Generated:
    prompt: str
    text: str
    token_ids: list[int]


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    texts: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    description: str | None = "generating",
    skip_special_tokens: bool = True,
    before_batch: Callable[[list[int]], None] | None = None,
    row_keys: Sequence[Hashable] | None = None,
) -> list[Generated]:
    """Greedy continuations of already chat-formatted `texts`, in the original order.

    `skip_special_tokens=False` keeps special tokens in the text (reasoning delimiters such as `<think>`
    that a judge must see to split the reasoning off). `before_batch(rows)` is told which rows (indices into
    `texts`, in batch order) the next batch holds, e.g. for hooks that treat rows differently; `row_keys`
    then says which rows those hooks treat alike (equal keys), so that the shared prefix is computed once per
    key - without it, rows under `before_batch` do not share their prefix."""
    device = model_device(model)
    prompt_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    # Batches by character length: the batches (and so the figures measured with them) stay as they were.
    batches = length_batches([len(t) for t in texts], batch_size)
    out: list[Generated | None] = [None] * len(texts)
    pad = pad_id(tokenizer)
    eos = model.generation_config.eos_token_id
    keys = list(row_keys) if row_keys is not None else None
    if keys is None and before_batch is None:
        keys = [0] * len(texts)
    if keys is not None and len(keys) != len(texts):
        raise ValueError("row_keys must name every text's rows")

    def step(rows: list[int]) -> None:
        seqs = [prompt_ids[i] for i in rows]
        # Every row keeps at least one token of its own after the prefix (the batch's first forward reads it).
        shared = common_prefix(seqs)[: min(len(q) for q in seqs) - 1] if keys is not None else []
        p = reusable_prefix(model, len(shared), max(len(q) for q in seqs) + max_new_tokens) if shared else 0
        extra: dict = {}
        if p:
            firsts = list(dict.fromkeys(keys[i] for i in rows))  # type: ignore[index]
            reps = [next(i for i in rows if keys[i] == k) for k in firsts]  # type: ignore[index]
            if before_batch is not None:
                before_batch(reps)
            cache = output_cache(
                model(input_ids=torch.tensor([shared[:p]] * len(reps), device=device), use_cache=True, logits_to_keep=1)
            )
            if cache is None or not hasattr(cache, "batch_select_indices"):
                p = 0
            else:
                where = {k: j for j, k in enumerate(firsts)}
                cache.batch_select_indices(torch.tensor([where[keys[i]] for i in rows], device=device))  # type: ignore[index]
                extra = {cache_kwarg(model): cache}
        if before_batch is not None:
            before_batch(rows)
        input_ids, mask = left_pad([q[p:] for q in seqs], pad)
        if p:
            input_ids = torch.cat([torch.tensor([shared[:p]] * len(rows), dtype=input_ids.dtype), input_ids], 1)
            mask = torch.cat([torch.ones((len(rows), p), dtype=mask.dtype), mask], 1)
        gen = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            **extra,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad,
            eos_token_id=eos,
        )
        new = gen[:, input_ids.shape[1] :].cpu()
        stops = set(eos if isinstance(eos, list) else [eos]) | {pad}
        for j, i in enumerate(rows):
            ids = new[j].tolist()
            cut = next((k for k, t in enumerate(ids) if t in stops), len(ids))
            ids = ids[:cut]
            out[i] = Generated(texts[i], tokenizer.decode(ids, skip_special_tokens=skip_special_tokens), ids)

    run_batches(model, batches, step, description)  # backs off once on out-of-memory (see forward)
    return out  # type: ignore[return-value]


@dataclass
class Streamed:
    """One streamed reply: its text and tokens, and when its first token came (seconds after the call)."""

    text: str
    token_ids: list[int]
    first_token_s: float | None
    seconds: float
    first_token_cpu_s: float | None = None  # CPU seconds of this process (all threads) until then: a load-free cost


@torch.inference_mode()
def stream(
    model,
    tokenizer,
    text: str,
    on_text: Callable[[str], None] | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
) -> Streamed:
    """One reply to an already chat-formatted `text`, handed to `on_text` piece by piece as it is generated.

    transformers' `TextStreamer` decodes the pieces (whole words, so a multi-byte character is never split);
    it runs in this thread, so Ctrl-C stops generation at once. Greedy unless `temperature` > 0."""
    from transformers import TextStreamer

    start, cpu = time.perf_counter(), time.process_time()
    first: list[tuple[float, float]] = []

    class Pieces(TextStreamer):
        def put(self, value):  # the prompt comes first (skipped), then one token per call
            if not self.next_tokens_are_prompt and not first:
                first.append((time.perf_counter() - start, time.process_time() - cpu))
            super().put(value)

        def on_finalized_text(self, piece: str, stream_end: bool = False) -> None:
            if piece and on_text is not None:
                on_text(piece)

    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model_device(model))
    greedy = temperature <= 0
    sampling = {"do_sample": not greedy, "temperature": None if greedy else temperature}
    eos = model.generation_config.eos_token_id
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        streamer=Pieces(tokenizer, skip_prompt=True, skip_special_tokens=True),
        pad_token_id=pad_id(tokenizer),
        eos_token_id=eos,
        top_p=None,
        top_k=None,
        **sampling,
    )
    new = out[0, ids.shape[1] :].tolist()
    stops = set(eos if isinstance(eos, list) else [eos])
    new = new[: next((k for k, t in enumerate(new) if t in stops), len(new))]
    reply = tokenizer.decode(new, skip_special_tokens=True)
    wall, cpu_s = first[0] if first else (None, None)
    return Streamed(reply, new, wall, time.perf_counter() - start, cpu_s)
