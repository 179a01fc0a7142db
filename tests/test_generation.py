"""Greedy generation computes the chat template's shared start once per batch (or per row group) and must
give exactly the replies of whole prompts."""

from __future__ import annotations

import pytest
import torch
from tiny import HIDDEN, build, tokenizer

from refusal_edit.edits.spec import DirectionBank, EditSpec, Strength, resolve
from refusal_edit.generation import generate
from refusal_edit.interventions import RowGroups, edit_hooks, edit_hooks_by_row
from refusal_edit.prompts import chat_format

INSTRUCTIONS = ["say hi", "count to three, slowly", "why?", "name a colour and a fruit", "ok", "spell cat"]


def _texts() -> list[str]:
    return chat_format(tokenizer()).format_all(INSTRUCTIONS)


def _counting(model) -> list[int]:
    """Tokens each forward pass of `model` embeds (a hook on the input embeddings)."""
    seen: list[int] = []
    model.get_input_embeddings().register_forward_hook(lambda _m, args, _o: seen.append(args[0].numel()))
    return seen


def _whole(model, texts, **kw):
    """The reference: every row's whole prompt (a `before_batch` without `row_keys` turns sharing off)."""
    return generate(model, tokenizer(), texts, description=None, before_batch=lambda _rows: None, **kw)


@pytest.mark.parametrize("model_type", ["qwen2", "gemma2", "llama", "falcon_h1"])
def test_a_shared_prefix_generates_the_replies_of_whole_prompts(model_type):
    model = build(model_type)
    model.generation_config.eos_token_id = 2
    texts = _texts()
    seen = _counting(model)
    shared = generate(model, tokenizer(), texts, max_new_tokens=10, batch_size=4, description=None)
    shared_tokens, seen[:] = sum(seen), []
    whole = _whole(model, texts, max_new_tokens=10, batch_size=4)
    assert [g.token_ids for g in shared] == [g.token_ids for g in whole]
    assert all(g.token_ids for g in whole)
    if model_type == "falcon_h1":  # a recurrent state cannot be shared: whole prompts, as before
        assert shared_tokens == sum(seen)
    else:  # the template's start (system prompt and role tokens) is embedded once per batch, not per row
        assert shared_tokens < sum(seen) - 40


def test_row_groups_share_the_prefix_per_edit():
    """Confirmation generates several edits in one batch: each group's prefix is computed under its own edit."""
    model = build("gemma2")  # sandwich norms: the per-writer basis differs from r
    model.generation_config.eos_token_id = 2
    g = torch.Generator().manual_seed(3)
    bank = DirectionBank(torch.randn(HIDDEN, generator=g))
    edits = [
        resolve(EditSpec(), bank, 3),
        None,
        resolve(EditSpec(attn=Strength(weight=0.5), mlp=Strength.window(1, 2), embedding=0.0), bank, 3),
    ]
    texts = _texts()
    keys = [k for k in range(len(edits)) for _ in texts]
    groups = RowGroups(keys)
    with edit_hooks_by_row(model, edits, groups):
        together = generate(
            model,
            tokenizer(),
            texts * len(edits),
            max_new_tokens=8,
            batch_size=len(keys),
            description=None,
            before_batch=groups.select,
            row_keys=keys,
        )
    for k, edit in enumerate(edits):
        if edit is None:
            alone = _whole(model, texts, max_new_tokens=8, batch_size=len(texts))
        else:
            with edit_hooks(model, edit):
                alone = _whole(model, texts, max_new_tokens=8, batch_size=len(texts))
        got = together[k * len(texts) : (k + 1) * len(texts)]
        assert [x.token_ids for x in got] == [x.token_ids for x in alone]
    n = len(texts)
    replies = [[x.token_ids for x in together[k * n : (k + 1) * n]] for k in range(len(edits))]
    assert replies[0] != replies[1] != replies[2]  # the edits change the replies: each group saw its own
