"""Refusal-rate intervals against published values (Newcombe 1998, Stat. Med. 17:857-872, tables I and II)."""

from __future__ import annotations

import pytest

from refusal_edit.evaluation.stats import count, difference, resolvable, wilson


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
