"""Greedy generation in batches (the batching engine's left padding and pad-id rule), shared by
refusal-token derivation and evaluation; and one reply streamed as it is generated (chat)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from refusal_edit.forward import left_pad, length_batches, model_device, pad_id, run_batches


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
) -> list[Generated]:
    """Greedy continuations of already chat-formatted `texts`, in the original order.

    `skip_special_tokens=False` keeps special tokens in the text (reasoning delimiters such as `<think>`
    that a judge must see to split the reasoning off). `before_batch(rows)` is told which rows (indices into
    `texts`, in batch order) the next batch holds, e.g. for hooks that treat rows differently."""
    device = model_device(model)
    prompt_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    # Batches by character length: the batches (and so the figures measured with them) stay as they were.
    batches = length_batches([len(t) for t in texts], batch_size)
    out: list[Generated | None] = [None] * len(texts)
    pad = pad_id(tokenizer)
    eos = model.generation_config.eos_token_id

    def step(rows: list[int]) -> None:
        if before_batch is not None:
            before_batch(rows)
        input_ids, mask = left_pad([prompt_ids[i] for i in rows], pad)
        gen = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
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
