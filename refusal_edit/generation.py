"""Greedy generation in batches (left padding, rich progress), shared by selection and evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from refusal_edit.console import track
from refusal_edit.forward import model_device


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
) -> list[Generated]:
    """Greedy continuations of already chat-formatted `texts`, in the original order."""
    device = model_device(model)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    out: list[Generated | None] = [None] * len(texts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = model.generation_config.eos_token_id
    it = batches if description is None else track(batches, description)
    for rows in it:
        enc = tokenizer([texts[i] for i in rows], return_tensors="pt", padding=True, add_special_tokens=False).to(
            device
        )
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad_id,
            eos_token_id=eos,
        )
        new = gen[:, enc["input_ids"].shape[1] :].cpu()
        stops = set(eos if isinstance(eos, list) else [eos]) | {pad_id}
        for j, i in enumerate(rows):
            ids = new[j].tolist()
            cut = next((k for k, t in enumerate(ids) if t in stops), len(ids))
            ids = ids[:cut]
            out[i] = Generated(texts[i], tokenizer.decode(ids, skip_special_tokens=True), ids)
    return out  # type: ignore[return-value]
