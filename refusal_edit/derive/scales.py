"""A scale measured on the tiny instance, stated as a formula of the config so it holds on the real model.

Formulas (strings, so that a derived spec can be cached as JSON): `one`, `sqrt_hidden`, `attr:NAME` (a
config value), `sqrt_hidden*attr:NAME`, or `unknown` (no formula matched: what needs the scale - baking an
addition into the embedding - is refused with a clear error, ablation does not need it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from refusal_edit.errors import RefusalEditError

REL_TOL = 1e-4


def _numbers(cfg: Any) -> dict[str, float]:
    out = {}
    for key, value in sorted(cfg.to_dict().items()):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value:
            out[key] = float(value)
    return out


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= REL_TOL * max(abs(a), abs(b), 1e-12)


def match_scale(value: float, cfg: Any) -> str:
    """The first formula that gives `value` on the tiny config (simplest first), else `unknown`."""
    hidden = float(cfg.hidden_size)
    if _close(value, 1.0):
        return "one"
    if _close(value, math.sqrt(hidden)):
        return "sqrt_hidden"
    numbers = _numbers(cfg)
    for key, number in numbers.items():
        if key != "hidden_size" and _close(value, number):
            return f"attr:{key}"
    for key, number in numbers.items():
        if key != "hidden_size" and _close(value, math.sqrt(hidden) * number):
            return f"sqrt_hidden*attr:{key}"
    return "unknown"


def scale_function(formula: str) -> Callable[[Any], float]:
    """The config -> scale function of a formula (see module docstring)."""

    def scale(cfg: Any) -> float:
        if formula == "one":
            return 1.0
        if formula == "unknown":
            raise RefusalEditError(
                "this architecture's embedding scale is not a config value this tool can read, so an addition "
                "cannot be baked into its embedding; use the run-time hook (evaluate `mode` add)"
            )
        value = 1.0
        for part in formula.split("*"):
            if part == "sqrt_hidden":
                value *= math.sqrt(float(cfg.hidden_size))
            else:
                value *= float(getattr(cfg, part.removeprefix("attr:")))
        return value

    scale.__name__ = formula
    return scale
