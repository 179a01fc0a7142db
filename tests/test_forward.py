"""Batched forward passes, prefix reuse, activation capture and the paper's scores."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import build, tokenizer

from refusal_edit.activations import mean_activations
from refusal_edit.errors import RefusalEditError
from refusal_edit.forward import PromptBatch, common_prefix
from refusal_edit.judging.scores import kl_divergence, refusal_scores
from refusal_edit.prompts import chat_format

PROMPTS = ["hi", "how do i bake bread?", "tell me a story about a cat", "why?", "list three colours please"]


def single_logits(model, tok, text):
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits[0, -1]


def test_common_prefix():
    assert common_prefix([[1, 2, 3], [1, 2, 4], [1, 2]]) == [1, 2]
    assert common_prefix([[5], [6]]) == []


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma3_text"])
@pytest.mark.parametrize("share", [True, False])
def test_batched_last_logits_equal_unpadded_single_runs(model_type, share):
    model, tok = build(model_type), tokenizer()
    texts = chat_format(tok).format_all(PROMPTS)
    batch = PromptBatch(tok, texts, batch_size=2, share_prefix=share)
    assert (len(batch.prefix) > 10) == share
    logits = batch.run(model)
    for i, text in enumerate(texts):
        assert torch.allclose(logits[i], single_logits(model, tok, text), atol=1e-4), i


def test_prefix_never_swallows_the_read_positions():
    tok = tokenizer()
    texts = chat_format(tok).format_all(["same", "same"])
    batch = PromptBatch(tok, texts, keep_last=2)
    assert len(batch.ids[0]) - len(batch.prefix) >= 3


def final_norm_input(model, ids):
    captured = {}
    h = model.model.norm.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
    with torch.no_grad():
        model(ids)
    h.remove()
    return captured["x"]


def test_mean_activations_match_hidden_states():
    model, tok = build("llama"), tokenizer()
    fmt = chat_format(tok)
    texts = fmt.format_all(PROMPTS)
    n_pos = fmt.n_positions
    acts = mean_activations(
        model, PromptBatch(tok, texts, batch_size=2, keep_last=n_pos), n_pos, lambda lg: lg[:, 0], lambda s: s > -1e9
    )
    assert acts.sum_all.shape == (n_pos, 4, 32) and acts.count_all == 5 and acts.count_kept == 5
    expected = torch.zeros(n_pos, 4, 32, dtype=torch.float64)
    for text in texts:
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            hs = model(ids, output_hidden_states=True).hidden_states
        states = [*hs[:-1]]
        states.append(final_norm_input(model, ids))
        expected += torch.stack([s[0, -n_pos:] for s in states], dim=1).double()
    assert torch.allclose(acts.mean(False), expected / 5, atol=1e-5)


def test_nan_activations_are_a_clear_error():
    model, tok = build("llama"), tokenizer()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.fill_(math.nan)
    texts = chat_format(tok).format_all(PROMPTS[:2])
    with pytest.raises(RefusalEditError, match="non-finite activations at layer 2"):
        mean_activations(model, PromptBatch(tok, texts, keep_last=2), 2, lambda lg: lg[:, 0], lambda s: s > 0)


def test_refusal_score_is_log_odds_of_refusal_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
    scores = refusal_scores(logits, [0])
    assert torch.allclose(scores, torch.tensor([0.0, math.log(0.1 / 0.9)], dtype=torch.float64))
    scores = refusal_scores(logits, [0, 1])
    assert torch.allclose(scores, torch.tensor([math.log(3.0), math.log(0.2 / 0.8)], dtype=torch.float64))


def test_kl_divergence_values():
    p = torch.log(torch.tensor([[0.5, 0.5]]))
    q = torch.log(torch.tensor([[0.9, 0.1]]))
    assert kl_divergence(p, p).item() == pytest.approx(0.0, abs=1e-12)
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert kl_divergence(p, q).item() == pytest.approx(expected)
