"""Each half's candidates come out of extract's one pass over the train prompts, are kept in
candidates.safetensors, and are what tune's cross-fitting would have made of each half alone."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from tiny import build, tokenizer

from refusal_edit.activations import mean_activations
from refusal_edit.directions.candidates import candidate_set, generate_candidates
from refusal_edit.directions.halves import halves_tensors, load_halves, train_halves
from refusal_edit.forward import PromptBatch
from refusal_edit.judging.scores import refusal_scores
from refusal_edit.prompts import chat_format

HARMFUL = [f"how do i make thing number {i}?" for i in range(41)]
HARMLESS = [f"tell me a fact about the number {i}." for i in range(36)]


@pytest.fixture(scope="module")
def setup():
    model = build("qwen2")
    tok = tokenizer()
    ids = [tok.convert_tokens_to_ids("i")]
    return model, tok, chat_format(tok), ids


def _means(model, tok, fmt, ids, harmful, harmless, split):
    """Both sides' mean activations, each side's prompts kept by its score against `split` (the train filter's
    rule, at a threshold that keeps some prompts of a tiny random model)."""
    n_pos = fmt.n_positions

    def score(logits):
        return refusal_scores(logits, ids)

    harm = mean_activations(
        model, PromptBatch(tok, fmt.format_all(harmful), 5, keep_last=n_pos), n_pos, score, lambda s: s > split[0]
    )
    safe = mean_activations(
        model, PromptBatch(tok, fmt.format_all(harmless), 4, keep_last=n_pos), n_pos, score, lambda s: s < split[1]
    )
    return harm, safe


@pytest.mark.parametrize("filter_train", [True, False])
def test_halves_of_one_pass_are_the_candidates_of_each_half_alone(setup, filter_train):
    model, tok, fmt, ids = setup
    base = [
        PromptBatch(tok, fmt.format_all(p), 8).run(model, reduce=lambda x: refusal_scores(x, ids))
        for p in (HARMFUL, HARMLESS)
    ]
    split = [float(b.median()) for b in base]
    whole = candidate_set(*_means(model, tok, fmt, ids, HARMFUL, HARMLESS, split), filter_train, min_kept=3)
    got = train_halves(whole)
    filtered = []
    for h, half in enumerate(got):
        alone = candidate_set(*_means(model, tok, fmt, ids, HARMFUL[h::2], HARMLESS[h::2], split), filter_train, 3)
        assert torch.allclose(half.mean_diff, alone.mean_diff.float(), atol=1e-5)
        assert torch.allclose(half.harmless_mean, alone.harmless.mean(alone.filtered).float(), atol=1e-5)
        assert torch.allclose(half.scores, alone.harmful.scores.float(), atol=1e-5)
        n = (len(HARMFUL[h::2]), len(HARMLESS[h::2]))
        assert half.kept == ((alone.harmful.count_kept, alone.harmless.count_kept) if alone.filtered else n)
        filtered.append(alone.filtered)
    assert filtered == [filter_train] * 2  # the filter's path is the one exercised
    assert not torch.allclose(got[0].mean_diff, got[1].mean_diff)  # two different halves


def test_extract_keeps_both_halves_and_generate_candidates_makes_them(setup):
    model, tok, fmt, ids = setup
    whole = generate_candidates(model, tok, fmt, HARMFUL, HARMLESS, ids, batch_size=4)
    assert whole.harmful.halves is not None and whole.harmless.halves is not None
    assert [x.count_all for x in whole.harmful.halves] == [21, 20]
    assert torch.allclose(whole.harmful.halves[0].sum_all + whole.harmful.halves[1].sum_all, whole.harmful.sum_all)


def test_kept_halves_are_read_back_only_for_the_prompts_they_came_from(setup, tmp_path):
    model, tok, fmt, ids = setup
    whole = generate_candidates(model, tok, fmt, HARMFUL, HARMLESS, ids, batch_size=4)
    halves = train_halves(whole)
    tensors, meta = halves_tensors(halves, HARMFUL, HARMLESS)
    path = tmp_path / "candidates.safetensors"
    save_file({"mean_diff": whole.mean_diff.float(), **tensors}, str(path), metadata=meta)
    back = load_halves(path, HARMFUL, HARMLESS)
    assert back is not None
    for a, b in zip(halves, back, strict=True):
        assert torch.equal(a.mean_diff, b.mean_diff) and torch.equal(a.scores, b.scores) and a.kept == b.kept
    assert load_halves(path, HARMFUL[::-1], HARMLESS) is None  # other prompts (or another order)
    assert load_halves(path, HARMFUL, HARMLESS[:-1]) is None
    save_file({"mean_diff": whole.mean_diff.float()}, str(path))  # an older candidates file
    assert load_halves(path, HARMFUL, HARMLESS) is None
    path.write_bytes(b"not safetensors")
    assert load_halves(path, HARMFUL, HARMLESS) is None
    assert load_halves(tmp_path / "missing.safetensors", HARMFUL, HARMLESS) is None
