"""Greedy generation computes the chat template's shared start once per batch (or per row group) and must
give exactly the replies of whole prompts."""

from __future__ import annotations

import pytest
import torch
from tiny import HIDDEN, build, mixed_edits, tokenizer

from refusal_edit.edits.spec import DirectionBank, EditSpec, resolve
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


SHARED_PREFIX_CASES = [
    ("qwen2", {}, True),
    ("gemma2", {}, True),
    ("llama", {}, True),
    ("gemma3_text", {"sliding_window": 512}, True),  # sliding-window layers beside full ones
    ("gpt_oss", {"sliding_window": 512}, True),
    ("gemma3_text", {}, False),  # a window (16) shorter than the prompts: the prefix would slide out
    ("falcon_h1", {}, False),  # a recurrent state cannot be copied per row
    ("qwen3_next", {}, False),
    ("lfm2", {}, False),
]


@pytest.mark.parametrize(("model_type", "overrides", "shares"), SHARED_PREFIX_CASES)
def test_a_shared_prefix_generates_the_replies_of_whole_prompts(model_type, overrides, shares):
    model = build(model_type, **overrides)
    model.generation_config.eos_token_id = 2
    texts = _texts()
    seen = _counting(model)
    shared = generate(model, tokenizer(), texts, max_new_tokens=10, batch_size=4, description=None)
    shared_tokens, seen[:] = sum(seen), []
    whole = _whole(model, texts, max_new_tokens=10, batch_size=4)
    assert [g.token_ids for g in shared] == [g.token_ids for g in whole]
    assert all(g.token_ids for g in whole)
    if shares:  # the template's start (system prompt and role tokens) is embedded once per batch, not per row
        assert shared_tokens < sum(seen) - 40
    else:  # whole prompts, as before
        assert shared_tokens == sum(seen)


def test_row_groups_share_the_prefix_per_edit():
    """Confirmation generates several edits in one batch: each group's prefix is computed under its own edit."""
    model = build("gemma2")  # sandwich norms: the per-writer basis differs from r
    model.generation_config.eos_token_id = 2
    edits = mixed_edits()
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


def test_groups_with_their_own_prompts_and_edits_share_batches_and_get_their_own_replies(monkeypatch):
    """tune's held-out judging generates both folds' prompts in one batch, each fold under its own bank's edit;
    a norm-preserving edit (no hook twin) is generated alone with its weights rewritten."""
    from refusal_edit.edits.memory import edited_weights
    from refusal_edit.tuning import confirm

    model = build("qwen2")
    model.generation_config.eos_token_id = 2
    g = torch.Generator().manual_seed(5)
    banks = [DirectionBank(torch.randn(HIDDEN, generator=g)) for _ in range(2)]
    texts = _texts()
    groups = [
        ("a, half 1", resolve(EditSpec(), banks[0], 3), texts[:4]),
        ("b, half 1", None, texts[:4]),
        ("a, half 2", resolve(EditSpec(), banks[1], 3), texts[4:] + texts[:1]),
        ("norm", resolve(EditSpec(preserve_norm=True), banks[0], 3), texts[1:3]),
    ]
    seen: list[int] = []
    real = confirm.generate
    monkeypatch.setattr(
        confirm, "generate", lambda m, t, texts, *a, **k: seen.append(len(texts)) or real(m, t, texts, *a, **k)
    )
    monkeypatch.setattr(confirm, "GROUP_ROWS", 9)  # 11 hookable rows in groups of 4, 4, 3: two batches
    got = confirm.replies_by_group(model, tokenizer(), groups, max_new_tokens=8, batch_size=2)
    for (_, edit, group_texts), replies in zip(groups, got, strict=True):
        if edit is None:
            ref = _whole(model, group_texts, max_new_tokens=8, batch_size=8)
        elif edit.preserve_norm:
            with edited_weights(model, edit):
                ref = _whole(model, group_texts, max_new_tokens=8, batch_size=8)
        else:
            with edit_hooks(model, edit):
                ref = _whole(model, group_texts, max_new_tokens=8, batch_size=8)
        assert [r.prompt for r in replies] == list(group_texts)
        assert [r.token_ids for r in replies] == [r.token_ids for r in ref]
    assert seen == [8, 3, 2]  # then the norm-preserving group alone
    assert [r.token_ids for r in got[0]] != [r.token_ids for r in got[1]]


def test_cross_fit_pools_each_points_replies_from_both_folds(monkeypatch):
    """One batch for both folds: each point's numbers come from its own groups, fold by fold."""
    from types import SimpleNamespace

    from refusal_edit.generation import Generated
    from refusal_edit.tuning import crossfit

    model = build("qwen2")
    folds = [
        SimpleNamespace(bank=DirectionBank(torch.randn(HIDDEN)), judged=["q1", "q2", "q3", "q4"]),
        SimpleNamespace(bank=DirectionBank(torch.randn(HIDDEN)), judged=["q5", "q6", "q7", "q8"]),
    ]
    refusing = {("t1", 0): {0}, ("t1", 1): {1, 2}, ("t2", 0): set(), ("t2", 1): {3}}

    def fake(_model, _tok, groups, _tokens, _rows):
        out = []
        for label, _edit, texts in groups:
            point, half = label.split(", half ")
            out.append(
                [
                    Generated(t, "I'm sorry, I can't help with that." if i in refusing[point, int(half) - 1] else
                              "Sure, here is a detailed plan for you to follow step by step.", [1])
                    for i, t in enumerate(texts)
                ]
            )  # fmt: skip
        return out

    monkeypatch.setattr(crossfit, "replies_by_group", fake)
    judge = crossfit.CrossFit(model, tokenizer(), chat_format(tokenizer()), folds, judged=6)
    t1, t2 = judge.measure([("t1", EditSpec()), ("t2", EditSpec(embedding=0.5))])
    assert judge.prompts == 6  # 3 per fold, each fold's first (most refused) prompts
    assert [f["failed"] for f in t1["folds"]] == [[0], [1, 2]] and t1["refused"] == 3
    assert [f["failed"] for f in t2["folds"]] == [[], []] and t2["refused"] == 0  # q8 (index 3) is not judged
    assert t1["failed"] == [0, 4, 5] and t1["prompts"] == 6


def test_confirmation_generates_the_base_continuations_with_the_first_replies(monkeypatch):
    """The base model's harmless continuations (what the KL is teacher-forced on) ride in the first batch of
    replies, and are what the base model generates for them alone; later measurements reuse them."""
    from refusal_edit.tuning import confirm

    model = build("llama")
    model.generation_config.eos_token_id = 2
    texts = _texts()
    calls: list[int] = []
    real = confirm.generate
    monkeypatch.setattr(confirm, "generate", lambda m, t, x, *a, **k: calls.append(len(x)) or real(m, t, x, *a, **k))
    c = confirm.Confirmer(model, tokenizer(), INSTRUCTIONS[:3], texts[:3], texts[3:], max_new_tokens=6, batch_size=4)
    bank = DirectionBank(torch.randn(HIDDEN, generator=torch.Generator().manual_seed(1)))
    first = c.measure([("base", None), ("paper", EditSpec())], bank)
    assert calls == [3 + 3 + 3]  # both points' replies and the 3 harmless continuations, one batch
    alone = _whole(model, texts[3:], max_new_tokens=6, batch_size=4)
    assert c.continuations == [g.token_ids for g in alone]
    assert first[0].first_token_kl == 0 and first[1].first_token_kl > 0
    again = c.measure([("paper", EditSpec())], bank)
    assert calls == [9, 3] and again[0].first_token_kl == pytest.approx(first[1].first_token_kl)
