"""Uncertainty of refusal rates: how far a rate measured on n prompts can be trusted.

Why: near the edits worth comparing, refusal rates are a few percent, and 100 test prompts cannot tell 1 %
from 3 % (Wilson 95 % intervals 0.2-5.4 % and 1.0-8.5 %). Every rate we report carries its interval, and a
comparison between two edits says whether their gap is larger than the measurement can resolve.

Wilson's score interval (not the normal approximation, which gives negative lower bounds at these rates) and
Newcombe's hybrid score interval for a difference of two independent proportions (his method 10). Both are a
few lines of closed-form arithmetic; scipy/statsmodels would be a heavy dependency for them.
"""

from __future__ import annotations

import math

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


def resolvable(gap: tuple[float, float]) -> bool:
    """Whether an interval of the gap between two rates (`difference`) excludes zero."""
    lo, hi = gap
    return lo > 0 or hi < 0


def count(rate: float, n: int) -> int:
    """The number of prompts behind a rate rounded in a report (rates are k / n, stored to 4 digits)."""
    return round(rate * n)
