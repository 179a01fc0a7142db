"""Greedy generation in batches (the batching engine's left padding and pad-id rule), shared by
refusal-token derivation and evaluation."""

from __future__ import annotations

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
