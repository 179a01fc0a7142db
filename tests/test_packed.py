"""Packed prompts (no padding) give the padded batches' last-position logits, or are not used."""

from __future__ import annotations

import pytest
import torch
from tiny import CONFIGS, build, tokenizer

from refusal_edit.forward import PromptBatch
from refusal_edit.packed import PackedPrompts, packed_or_padded

TEXTS = [
    "<s><|system|>you are a tiny test model.<|end|><|user|>" + t + "<|end|><|assistant|>"
    for t in ("hi", "how do i bake bread?", "a much longer question about many things, really", "ok", "why?")
]


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma2", "gpt2", "qwen2_moe"])
def test_packed_logits_equal_padded(model_type):
    model, tok = build(model_type), tokenizer()
    packed, padded = PackedPrompts(tok, TEXTS, max_tokens=30), PromptBatch(tok, TEXTS, 2)
    assert len(packed.chunks) > 1  # chunking exercised
    with torch.no_grad():
        a, b = packed.run(model), padded.run(model)
    assert a.shape == b.shape == (len(TEXTS), 128)
    assert (a - b).abs().max().item() <= 1e-4
    batch, logits = packed_or_padded(model, tok, TEXTS, 4)
    assert isinstance(batch, PackedPrompts)
    with torch.no_grad():
        assert torch.equal(logits, batch.run(model))  # the check's own logits: the batch's, not run again


def test_recurrent_models_never_pack():
    recurrent = [t for t in ("qwen3_next", "falcon_h1", "lfm2") if t in CONFIGS]
    if not recurrent:
        pytest.skip("no recurrent hybrid in the table yet")
    model = build(recurrent[0])
    assert isinstance(packed_or_padded(model, tokenizer(), TEXTS, 4)[0], PromptBatch)
