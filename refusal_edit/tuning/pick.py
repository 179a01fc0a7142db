"""Which confirmed point `tune` picks, and why each point nearer the base model lost.

A user who runs `tune` wants the model to stop refusing, and then to be damaged as little as possible. So the
default rule (`least-damage`): among the confirmed points whose refused-or-degenerate rate cannot be told from
the lowest confirmed rate, the one with the least first-token KL, then multi-token KL. "Cannot be told":
Newcombe's 95 % interval of the gap between the two rates includes zero (`evaluation.stats`). Why not a KL cap
with the fewest refusals under it (the old rule): a cap makes the pick flip on noise - a point 0.0002 nats
over it lost to one that refused more. Here a gap in refusals the prompts can resolve always loses, whatever
the KL, and one they cannot resolve is a tie that damage decides.

The rates are judged in two stages. First on the confirmation's val prompts (a few dozen, every confirmed
point). Then, for the points still in the running, on more prompts none of their directions was fitted to
(`resolved`: the cross-fitted train prompts, `tuning.crossfit`): among the points that have such numbers, a
point resolvably above the lowest of them loses too. `to_resolve` says which points need them: first the
point at the lowest val rate that damages most (along the front the likeliest to refuse least: the one the
others are judged against) and the least damaging of the rest; then, round after round, the unjudged points
that would beat the best judged one.

Alternatives (`PickRule`): `fewest-refusals` (the lowest rate on the deciding prompts, ties by damage), a point
id (that point), and a first-token KL cap (`max_kl`, off by default) over any rule; when no point is under
the cap, the point with the least first-token KL is picked and the result says so.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from refusal_edit.errors import RefusalEditError
from refusal_edit.evaluation.stats import count, difference, resolvable, wilson

RuleKind = Literal["least-damage", "fewest-refusals", "point"]
UNDER = "least-damage-under:"  # `least-damage-under:KL`: the default rule under a first-token KL cap
POINT_ID = re.compile(r"t\d+")


@dataclass(frozen=True)
class PickRule:
    """How `tune` picks: `kind`, an optional first-token KL cap (nats), the point id when `kind` is `point`."""

    kind: RuleKind = "least-damage"
    max_kl: float | None = None
    point: str | None = None

    def __post_init__(self) -> None:
        if (self.kind == "point") != (self.point is not None):
            raise RefusalEditError("a point pick names one point id, and only it does")
        if self.point is not None and not POINT_ID.fullmatch(self.point):
            raise RefusalEditError(f"a point id is t<trial number>, e.g. t27; got {self.point!r}")
        if self.max_kl is not None and not self.max_kl > 0:
            raise RefusalEditError(f"the KL cap must be positive, got {self.max_kl:g}")

    @property
    def trial(self) -> int | None:
        """The trial number of a point pick."""
        return None if self.point is None else int(self.point[1:])

    @classmethod
    def parse(cls, text: str, max_kl: float | None = None) -> PickRule:
        """`least-damage`, `fewest-refusals`, `least-damage-under:KL` or a point id (`t27`), with an optional cap."""
        text = text.strip()
        if text.startswith(UNDER):
            try:
                cap = float(text[len(UNDER) :])
            except ValueError:
                raise RefusalEditError(f"{text!r}: expected {UNDER}KL, e.g. {UNDER}0.1") from None
            if max_kl is not None and max_kl != cap:
                raise RefusalEditError(f"two KL caps given ({cap:g} and {max_kl:g}); give one")
            return cls("least-damage", cap)
        if text in ("least-damage", "fewest-refusals"):
            return cls(text, max_kl)  # type: ignore[arg-type]
        if POINT_ID.fullmatch(text):
            return cls("point", max_kl, text)
        raise RefusalEditError(
            f"unknown pick {text!r}: least-damage, fewest-refusals, {UNDER}KL or a point id such as t27"
        )

    def describe(self) -> str:
        cap = "" if self.max_kl is None else f", first-token KL <= {self.max_kl:g}"
        if self.kind == "point":
            return f"the point named: {self.point}"
        if self.kind == "fewest-refusals":
            return f"fewest refused-or-degenerate replies{cap}; ties: less first-token KL, then multi-token KL"
        return (
            f"least damage (first-token KL, then multi-token KL) among the points whose refused-or-degenerate rate "
            f"cannot be told from the lowest (95% intervals){cap}"
        )


@dataclass
class Judged:
    """Refused-or-degenerate replies of a point on one set of prompts."""

    failures: int
    prompts: int

    @property
    def rate(self) -> float:
        return self.failures / self.prompts

    @property
    def ci95(self) -> tuple[float, float]:
        return wilson(self.failures, self.prompts)

    def gap(self, other: Judged) -> tuple[float, float]:
        """Newcombe's 95 % interval of this rate minus `other`'s."""
        return difference(self.failures, self.prompts, other.failures, other.prompts)

    def text(self) -> str:
        lo, hi = self.ci95
        return f"{100 * self.rate:.1f}% ({self.failures}/{self.prompts}; 95% CI {100 * lo:.1f}-{100 * hi:.1f}%)"


def val_numbers(point: dict[str, Any]) -> Judged:
    """A point's refused-or-degenerate replies on the confirmation's val prompts."""
    c = point["confirmed"]
    n = int(c["prompts"])
    return Judged(count(c["refusal_rate"], n) + count(c["degenerate_rate"], n), n)


def held_out_numbers(point: dict[str, Any]) -> Judged | None:
    """The same on the prompts no direction of the point was fitted to (`resolved`), when measured."""
    r = point.get("resolved")
    return None if not r else Judged(int(r["refused"]) + int(r["degenerate"]), int(r["prompts"]))


def damage(point: dict[str, Any]) -> tuple[float, float]:
    """(first-token KL, multi-token KL): the order in which damage decides."""
    c = point["confirmed"]
    multi = c["multi_token_kl"]
    return c["first_token_kl"], math.inf if multi is None else multi


@dataclass
class Picked:
    """The pick: its index among the points, the rule's text, and a one-line verdict for every point."""

    index: int | None
    rule: str
    within_max_kl: bool
    verdicts: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _gap_text(a: Judged, b: Judged) -> str:
    lo, hi = a.gap(b)
    return f"gap {100 * (a.rate - b.rate):+.1f} pts, 95% CI {100 * lo:+.1f} to {100 * hi:+.1f}"


@dataclass
class _Stages:
    """The default rule's two exclusions, and the points left after them."""

    eligible: list[int]
    lowest_val: int
    out_val: dict[int, str]
    lowest_held: int | None
    out_held: dict[int, str]

    @property
    def contenders(self) -> list[int]:
        return [i for i in self.eligible if i not in self.out_val and i not in self.out_held]


def _eligible(points: Sequence[dict[str, Any]], rule: PickRule) -> list[int]:
    cap = math.inf if rule.max_kl is None else rule.max_kl
    return [i for i, p in enumerate(points) if p["confirmed"]["first_token_kl"] <= cap]


def _lowest(points: Sequence[dict[str, Any]], indices: Sequence[int], numbers) -> int:
    """The point with the fewest failures (as `numbers` judges them), ties to the least damage."""
    return min(indices, key=lambda i: (numbers(points[i]).rate, damage(points[i])))


def _above(
    points: Sequence[dict[str, Any]], indices: Sequence[int], lowest: int, numbers, where: str
) -> dict[int, str]:
    """The points whose rate is resolvably above the lowest point's, each with why."""
    base = numbers(points[lowest])
    out = {}
    for i in indices:
        mine = numbers(points[i])
        if i != lowest and resolvable(mine.gap(base)) and mine.rate > base.rate:
            out[i] = (
                f"refused or degenerate {mine.text()} on {where}, resolvably more than {points[lowest]['id']}'s "
                f"{base.text()} ({_gap_text(mine, base)})"
            )
    return out


def _stages(points: Sequence[dict[str, Any]], eligible: list[int]) -> _Stages:
    lowest_val = _lowest(points, eligible, val_numbers)
    out_val = _above(points, eligible, lowest_val, val_numbers, "the val prompts")
    held = [i for i in eligible if i not in out_val and held_out_numbers(points[i]) is not None]
    if not held:
        return _Stages(eligible, lowest_val, out_val, None, {})
    lowest_held = _lowest(points, held, held_out_numbers)
    out_held = _above(points, held, lowest_held, held_out_numbers, "held-out prompts")
    return _Stages(eligible, lowest_val, out_val, lowest_held, out_held)


def pick(points: Sequence[dict[str, Any]], rule: PickRule | None = None) -> Picked:
    """The point `rule` picks among the confirmed points (dicts with `confirmed` and maybe `resolved` numbers),
    with a verdict for every point (module docstring)."""
    rule = rule or PickRule()
    text = rule.describe()
    if not points:
        return Picked(None, "no confirmed points", False)
    ids = [p["id"] for p in points]
    if rule.kind == "point":
        if rule.point not in ids:
            raise RefusalEditError(f"no confirmed point {rule.point!r} (confirmed: {', '.join(ids)})")
        index = ids.index(rule.point)
        return Picked(index, text, True, {p: "picked: named" if p == rule.point else "not named" for p in ids})
    eligible = _eligible(points, rule)
    if not eligible:
        best = min(range(len(points)), key=lambda i: damage(points[i]))
        why = f"no point has first-token KL <= {rule.max_kl:g}: the least first-token KL"
        return Picked(
            best, why, False, {p: "picked: least KL" if i == best else "over the KL cap" for i, p in enumerate(ids)}
        )
    verdicts = {
        p["id"]: f"first-token KL {p['confirmed']['first_token_kl']:.4f} over the cap {rule.max_kl:g}"
        for i, p in enumerate(points)
        if i not in eligible
    }
    if rule.kind == "fewest-refusals":
        held = [i for i in eligible if held_out_numbers(points[i]) is not None]
        numbers, where = (held_out_numbers, "held-out prompts") if held else (val_numbers, "the val prompts")
        index = _lowest(points, held or eligible, numbers)
        for i in eligible:
            if i != index:
                mine = numbers(points[i]) if i in (held or eligible) else None
                verdicts[ids[i]] = (
                    "not judged on held-out prompts"
                    if mine is None
                    else f"refused or degenerate {mine.text()} on {where}, "
                    f"{'more than' if mine.rate > numbers(points[index]).rate else 'ties with'} {ids[index]}"
                )
        verdicts[ids[index]] = "picked"
        return Picked(index, text, True, verdicts)
    stages = _stages(points, eligible)
    index = min(stages.contenders, key=lambda i: damage(points[i]))
    for i in eligible:
        verdicts[ids[i]] = stages.out_val.get(i) or stages.out_held.get(i) or _more_damage(points[i], points[index])
    verdicts[ids[index]] = "picked: " + _picked_why(points, stages, index)
    return Picked(index, text, True, verdicts)


def _more_damage(point: dict[str, Any], chosen: dict[str, Any]) -> str:
    (f, m), (fc, mc) = damage(point), damage(chosen)
    return (
        f"refusals not told apart from the lowest, more damage than {chosen['id']}: first-token KL {f:.4f} vs "
        f"{fc:.4f}, multi-token {m:.4f} vs {mc:.4f}"
    )


def _picked_why(points: Sequence[dict[str, Any]], stages: _Stages, index: int) -> str:
    where = [
        f"the lowest val rate is {points[stages.lowest_val]['id']}'s {val_numbers(points[stages.lowest_val]).text()}"
    ]
    if stages.lowest_held is not None:
        low = points[stages.lowest_held]
        where.append(f"the lowest held-out rate {low['id']}'s {held_out_numbers(low).text()}")  # type: ignore[union-attr]
    return "least damage among the points not resolvably above the lowest rate (" + "; ".join(where) + ")"


def to_resolve(points: Sequence[dict[str, Any]], rule: PickRule, limit: int) -> list[int]:
    """The points whose held-out numbers could change the pick, `limit` at most (none for a point pick; module
    docstring): before any is judged, the most damaging point at the lowest val rate and the least damaging of
    the points not resolvably above it; after, the unjudged ones of those with less damage than the best judged
    one (none for `fewest-refusals`)."""
    if rule.kind == "point" or limit < 1:
        return []
    eligible = _eligible(points, rule)
    if not eligible:
        return []
    stages = _stages(points, eligible)
    unmeasured = [i for i in stages.contenders if held_out_numbers(points[i]) is None]
    if stages.lowest_held is None:  # nothing measured yet
        low = val_numbers(points[stages.lowest_val]).rate
        anchor = max((i for i in unmeasured if val_numbers(points[i]).rate == low), key=lambda i: damage(points[i]))
        rest = sorted((i for i in unmeasured if i != anchor), key=lambda i: damage(points[i]))
        return [anchor, *rest][:limit]
    if rule.kind == "fewest-refusals":
        return []
    measured = [i for i in stages.contenders if i not in unmeasured]
    bar = min((damage(points[i]) for i in measured), default=(math.inf, math.inf))
    nearer = sorted((i for i in unmeasured if damage(points[i]) < bar), key=lambda i: damage(points[i]))
    return nearer[:limit]
