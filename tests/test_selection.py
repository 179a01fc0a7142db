"""Selection logic: filters, the fast path's agreement with the exhaustive reference, error hints."""

from __future__ import annotations

import math

import pytest
from tiny import build, tokenizer

from refusal_edit.cli.app import in_flags
from refusal_edit.directions.candidates import generate_candidates
from refusal_edit.directions.refusal_tokens import user_refusal_tokens
from refusal_edit.directions.select import (
    Candidate,
    Scorer,
    SelectionSettings,
    judge,
    pick,
    select_exhaustive,
    select_fast,
)
from refusal_edit.errors import RefusalEditError
from refusal_edit.prompts import builtin, chat_format


def short(kind: str, split: str, n: int) -> list[str]:
    return [t[:40] for t in builtin(kind).split(split).sample(n).instructions]


@pytest.fixture(scope="module")
def scorer_factory():
    model, tok = build("llama"), tokenizer()
    fmt = chat_format(tok)
    ids = user_refusal_tokens(tok, ["i", "as"]).ids
    cands = generate_candidates(model, tok, fmt, short("harmful", "train", 8), short("harmless", "train", 8), ids)
    h_val, s_val = fmt.format_all(short("harmful", "val", 4)), fmt.format_all(short("harmless", "val", 4))

    def make(share_prefix: bool) -> tuple[Scorer, list[str]]:
        return Scorer(model, tok, h_val, s_val, ids, cands, batch_size=4, share_prefix=share_prefix), h_val

    return make


def test_fast_path_scoring_everything_agrees_with_exhaustive(scorer_factory):
    settings = SelectionSettings(kl_threshold=1e9, induce_threshold=-1e9, top_k=100)
    exhaustive = select_exhaustive(scorer_factory(False)[0], settings)
    scorer, h_val = scorer_factory(True)
    fast = select_fast(scorer, settings, tokenizer(), h_val)
    assert (fast.chosen.position, fast.chosen.layer) == (exhaustive.chosen.position, exhaustive.chosen.layer)
    assert fast.chosen.bypass == pytest.approx(exhaustive.chosen.bypass, abs=1e-4)
    assert all(c.proxy is not None for c in fast.candidates if c.discarded not in ("late layer", "nan"))


def test_fast_path_scores_only_top_k_bypasses(scorer_factory):
    scorer, h_val = scorer_factory(True)
    sel = select_fast(scorer, SelectionSettings(kl_threshold=1e9, induce_threshold=-1e9, top_k=2), tokenizer(), h_val)
    assert sel.evaluated == 2
    assert sum(c.bypass is not None for c in sel.candidates) == 2
    assert sel.details["proxy_rank_of_chosen"] in (1, 2)


def test_judge_applies_the_papers_filters():
    s = SelectionSettings()  # KL <= 0.1, induce >= 0, layers < int(10 * 0.8) = 8
    assert judge(Candidate(-1, 8, -5.0, 1.0, 0.01), s, 10).discarded == "late layer"
    assert judge(Candidate(-1, 3, -5.0, 1.0, 0.2), s, 10).discarded == "kl"
    assert judge(Candidate(-1, 3, -5.0, -0.1, 0.05), s, 10).discarded == "induce"
    assert judge(Candidate(-1, 3, math.nan, 1.0, 0.05), s, 10).discarded == "nan"
    assert judge(Candidate(-1, 3, -5.0, None, 0.5), s, 10).discarded == "kl"  # KL alone rules it out
    assert judge(Candidate(-1, 3, -5.0, None, 0.05), s, 10).discarded == "not evaluated"
    assert judge(Candidate(-1, 3, -5.0, 0.5, 0.05), s, 10).discarded is None


def test_pick_lowest_bypass_or_explain():
    a, b = Candidate(-1, 2, -3.0, 0.5, 0.05), Candidate(-2, 4, -4.0, 0.5, 0.05)
    assert pick([a, b]) is b
    c = Candidate(-1, 5, -6.0, -0.321, 0.2501, discarded="kl")
    d = Candidate(-2, 5, -2.0, 0.1, 0.3, discarded="kl")
    with pytest.raises(RefusalEditError) as err:
        pick([c, d, Candidate(-1, 9, discarded="late layer")])
    msg = str(err.value)
    assert "every candidate was filtered out (kl: 2, late layer: 1)" in msg
    assert "layer 5 position -1 (bypass -6.00) needs `kl_threshold` 0.251 `induce_threshold` -0.33" in msg
    # The command line names its own flags (library errors name parameters).
    flags = {"kl_threshold": "--kl-threshold", "induce_threshold": "--induce-threshold"}
    assert "needs --kl-threshold 0.251 --induce-threshold -0.33" in in_flags(msg, flags)


def test_settings_merge_recipe_then_command_line():
    s = SelectionSettings.merged(
        {"batch_size": 4}, {"kl_threshold": 0.2, "unknown": 1}, {"kl_threshold": None, "top_k": 3}
    )
    assert (s.kl_threshold, s.top_k, s.batch_size, s.induce_threshold) == (0.2, 3, 4, 0.0)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("prune_layer_fraction", -1.0, "`prune_layer_fraction` must be a fraction in [0, 1), got -1"),
        ("prune_layer_fraction", 1.0, "`prune_layer_fraction` must be a fraction in [0, 1), got 1"),
        ("top_k", 0, "`top_k` must be at least 1"),
        ("batch_size", 0, "`batch_size` must be at least 1"),
        ("kl_threshold", math.nan, "`kl_threshold` must be a number"),
    ],
)
def test_settings_out_of_range_are_errors_naming_the_parameter(field, value, message):
    with pytest.raises(RefusalEditError) as err:
        SelectionSettings(**{field: value}).check()
    assert message in str(err.value)


def test_relaxation_steps_until_a_candidate_passes_and_hints_never_tighten():
    from refusal_edit.directions.select import RELAX_STEPS, describe_relaxation, relax, relaxed

    s = SelectionSettings()  # KL <= 0.1, induce >= 0
    assert [relaxed(s, i).kl_threshold for i in range(1, RELAX_STEPS + 1)] == [0.2, 0.4, 0.8, 1.6]
    assert [relaxed(s, i).induce_threshold for i in range(1, RELAX_STEPS + 1)] == [-0.5, -1.0, -1.5, -2.0]
    # The demo model's situation: the best bypass needs KL 0.17 and induce -0.21 -> one step admits it.
    best = Candidate(-1, 16, -3.22, -0.209, 0.170)
    other = Candidate(-1, 12, -2.0, 0.3, 0.35)
    chosen, info = relax([other, best], s, 24)
    assert chosen is best and info["steps"] == 1
    assert info["to"] == {"kl_threshold": 0.2, "induce_threshold": -0.5}
    assert describe_relaxation(info) == (
        "no candidate passed KL <= 0.1, induce >= 0: relaxed to KL <= 0.2, induce >= -0.5"
    )
    # A candidate discarded for induce only: the hint must not suggest a tighter KL threshold.
    c = Candidate(-1, 5, -6.0, -0.4, 0.05, discarded="induce")
    with pytest.raises(RefusalEditError) as err:
        pick([c], s)
    assert "kl_threshold" not in str(err.value) and "`induce_threshold` -0.40" in str(err.value)


def test_fast_path_names_each_pass_for_progress_and_the_memory_benches(scorer_factory, monkeypatch):
    """KL and induce of the top candidates are a progress task of their own (bench/big.py and
    bench/offload_passes.py attribute memory to the passes the progress names; unnamed, they were 'other')."""
    import refusal_edit.directions.select as select

    passes: dict[str, int] = {}

    def recording(items, description, total=None):
        for item in items:
            passes[description] = passes.get(description, 0) + 1
            yield item

    monkeypatch.setattr(select, "track", recording)
    scorer, h_val = scorer_factory(True)
    sel = select_fast(scorer, SelectionSettings(kl_threshold=1e9, induce_threshold=-1e9, top_k=2), tokenizer(), h_val)
    assert passes["bypass of the top candidates (1)"] == 2
    # the lowest bypass passes the filters at once: one KL and one induce, then the loop stops
    assert passes["KL and induce of the top candidates (1)"] == 1
    assert sum(c.kl is not None for c in sel.candidates) == 1
