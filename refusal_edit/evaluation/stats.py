"""Uncertainty of refusal rates: how far a rate measured on n prompts can be trusted.

Why: near the edits worth comparing, refusal rates are a few percent, and 100 test prompts cannot tell 1 %
from 3 % (Wilson 95 % intervals 0.2-5.4 % and 1.0-8.5 %). Every rate we report carries its interval, and a
comparison between two edits says whether their gap is larger than the measurement can resolve.

Wilson's score interval (not the normal approximation, which gives negative lower bounds at these rates),
Newcombe's hybrid score interval for a difference of two independent proportions (his method 10), and its
paired twin for two rates measured on the same prompts (`paired`). All are a few lines of closed-form
arithmetic; scipy/statsmodels would be a heavy dependency for them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

Z95 = 1.959963984540054  # two-sided 95 %


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion `k / n` (n = 0: the uninformative [0, 1])."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


def difference(k1: int, n1: int, k2: int, n2: int, z: float = Z95) -> tuple[float, float]:
    """Newcombe's interval for p1 - p2 (p1 = k1 / n1, p2 = k2 / n2, independent samples)."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson(k1, n1, z)
    l2, u2 = wilson(k2, n2, z)
    d = p1 - p2
    return d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def paired(both: int, only_first: int, only_second: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Newcombe's square-and-add interval for p1 - p2 when both rates were measured on the same n items
    (Newcombe 1998, "Improved confidence intervals for the difference between binomial proportions based on
    paired data", Statistics in Medicine 17:2635-2650, method 10; recommended by Fagerland, Lydersen & Laake
    2014): `both` items counted in both rates, `only_first` / `only_second` in one of them.

    Why paired: two edits judged on the same prompts fail on the same hardest prompts (their refusals
    concentrate where the base model refuses hardest), so their rates are correlated and the gap is only as
    uncertain as the prompts on which they disagree; `difference` treats the two samples as independent and
    is then too wide. 7 against 2 of 96 prompts, the 2 among the 7: unpaired -1.2 to +12.4 points, paired
    +0.1 to +11.8 - resolved. The Wilson intervals of the two marginal rates are combined with their
    correlation phi, continuity-corrected towards zero as Newcombe prescribes (ad - bc above n/2 is reduced
    by n/2; between 0 and n/2 it counts as 0). With no item in both (a = 0) phi is at most 0 and the
    interval is no narrower than `difference`'s: there is no agreement to lean on.
    """
    neither = n - both - only_first - only_second
    if min(both, only_first, only_second, neither) < 0:
        raise ValueError(
            f"need non-negative cells, got both={both}, only_first={only_first}, only_second={only_second}, n={n}"
        )
    if n == 0:
        return -1.0, 1.0
    k1, k2 = both + only_first, both + only_second
    p1, p2 = k1 / n, k2 / n
    l1, u1 = wilson(k1, n, z)
    l2, u2 = wilson(k2, n, z)
    cross = both * neither - only_first * only_second
    cross = cross - n / 2 if cross > n / 2 else min(cross, 0)
    margins = k1 * (n - k1) * k2 * (n - k2)
    phi = cross / math.sqrt(margins) if margins else 0.0
    below = (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2
    above = (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2
    d = p1 - p2
    return max(-1.0, d - math.sqrt(max(below, 0.0))), min(1.0, d + math.sqrt(max(above, 0.0)))


def paired_sets(first: Iterable[int], second: Iterable[int], n: int, z: float = Z95) -> tuple[float, float]:
    """`paired` from the two sets of items (indices among the same n) that each rate counted."""
    a, b = set(first), set(second)
    return paired(len(a & b), len(a - b), len(b - a), n, z)


def resolvable(gap: tuple[float, float]) -> bool:
    """Whether an interval of the gap between two rates (`difference`) excludes zero."""
    lo, hi = gap
    return lo > 0 or hi < 0


def count(rate: float, n: int) -> int:
    """The number of prompts behind a rate rounded in a report (rates are k / n, stored to 4 digits)."""
    return round(rate * n)
