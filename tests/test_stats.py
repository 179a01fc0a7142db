"""Refusal-rate intervals against published values (Newcombe 1998, Stat. Med. 17:857-872, tables I and II)."""

from __future__ import annotations

import pytest

from refusal_edit.evaluation.stats import count, difference, paired, paired_sets, resolvable, wilson


@pytest.mark.parametrize(
    ("k", "n", "lo", "hi"),
    [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)],
)
def test_wilson_matches_newcombe_table(k: int, n: int, lo: float, hi: float):
    assert wilson(k, n) == pytest.approx((lo, hi), abs=1e-4)


def test_wilson_edges_and_bad_counts():
    assert wilson(0, 100)[0] == 0.0 and wilson(100, 100)[1] == 1.0
    assert wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson(5, 4)


def test_difference_matches_newcombe_method_10():
    assert difference(56, 70, 48, 80) == pytest.approx((0.0524, 0.3339), abs=1e-4)
    assert difference(9, 10, 3, 10) == pytest.approx((0.1705, 0.8090), abs=1e-4)


def test_one_in_a_hundred_against_three_is_not_resolvable():
    assert not resolvable(difference(3, 100, 1, 100))
    assert resolvable(difference(13, 100, 1, 100))
    assert count(0.03, 100) == 3 and count(0.0125, 240) == 3


def test_paired_matches_the_published_square_and_add_interval():
    """Newcombe's paired method 10 on Cavo et al. 2012 (59 both, 6 first only, 16 second only, 80 neither), as
    Fagerland, Lydersen & Laake publish it (Statistical Analysis of Contingency Tables, ch. 8): -0.0621,
    95 % CI -0.1186 to -0.0046."""
    assert paired(59, 6, 16, 161) == pytest.approx((-0.1186, -0.0046), abs=1e-4)
    # the mirror image: the gap the other way round
    assert paired(59, 16, 6, 161) == pytest.approx((0.0046, 0.1186), abs=1e-4)


def test_paired_resolves_what_unpaired_cannot_when_the_failures_are_the_same_prompts():
    """7 and 2 failures of 96, the 2 among the 7. By hand: Wilson 7/96 = 0.0358-0.1429, 2/96 = 0.0057-0.0728;
    phi = (2 * 89 - 0 - 96 / 2) / sqrt(7 * 89 * 2 * 94) = 0.3799; so +0.10 to +11.79 points, where the
    unpaired interval is -1.18 to +12.37. 6 against 2 the same way is 4 discordant prompts, all one way
    (McNemar's exact p = 0.125): not resolved, paired or not."""
    assert paired(2, 5, 0, 96) == pytest.approx((0.00095, 0.11786), abs=1e-5)
    assert resolvable(paired(2, 5, 0, 96)) and not resolvable(difference(7, 96, 2, 96))
    assert paired_sets(range(7), range(2), 96) == paired(2, 5, 0, 96)
    assert not resolvable(paired(2, 4, 0, 96))
    # no prompt in both: nothing to lean on, the paired interval is the unpaired one (phi = 0)
    assert paired(0, 2, 0, 32) == pytest.approx(difference(2, 32, 0, 32))
    with pytest.raises(ValueError, match="non-negative"):
        paired(5, 5, 5, 10)
