"""Which confirmed point `tune` picks, and why each point nearer the base model lost.

A user who runs `tune` wants the model to stop refusing, and then to be damaged as little as possible. So the
default rule (`least-damage`): among the confirmed points whose refused-or-degenerate rate cannot be told from the
lowest confirmed rate, the one with the least first-token KL, then multi-token KL (below: what "cannot be told"
means at each stage). Why not a KL cap with the fewest refusals under it (the old rule): a cap makes the pick flip
on noise - a point 0.0002 nats over it lost to one that refused more. Here a gap in refusals the prompts can resolve
always loses, whatever the KL, and one they cannot resolve is a tie that damage decides.

The rates are judged in two stages. First on the confirmation's val prompts (a few dozen, every confirmed point): a
point resolvably above the lowest rate loses. Then, for the points still in the running, on more prompts none of
their directions was fitted to (`resolved`: the cross-fitted train prompts, `tuning.crossfit`): among the points
that have such numbers, a point ties with the lowest of them only when the upper end of its gap's 95 % interval is
under a non-inferiority margin (`MARGIN`, 8 points; `margin=None`: only a gap resolvably above zero loses). Without
the margin a point failing three times as often as the lowest (6 against 2 of 96) tied, because 96 prompts cannot
resolve it, and it refused resolvably more than the paper's edit on the test split. Every gap is paired
(`evaluation.stats.paired`) where both points kept which prompts failed on the same prompt list - they do in every
`tune` record since: the prompts that fail under one edit fail under its neighbours, so the paired interval is the
narrower, honest one - and unpaired otherwise.

`to_resolve` says which points need held-out numbers: first the point at the lowest val rate that damages most
(along the front the likeliest to refuse least: the one the others are judged against) and the least damaging of the
rest; then, round after round, the unjudged points that would beat the best judged one.

Alternatives (`PickRule`): `fewest-refusals` (the lowest rate on the deciding prompts, ties by damage), a point id
(that point), and a first-token KL cap (`max_kl`, off by default) over any rule; when no point is under the cap, the
point with the least first-token KL is picked and the result says so.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from refusal_edit.errors import RefusalEditError
from refusal_edit.evaluation.stats import count, difference, paired_sets, resolvable, wilson

RuleKind = Literal["least-damage", "fewest-refusals", "point"]
# The held-out tie's non-inferiority margin (a share of the prompts): a judged point ties with the lowest only
# when the upper end of its gap's 95 % interval is under it (docs/tune.md, "The margin": why 8 points).
MARGIN = 0.08
UNDER = "least-damage-under:"  # `least-damage-under:KL`: the default rule under a first-token KL cap
POINT_ID = re.compile(r"t\d+")


@dataclass(frozen=True)
class PickRule:
    """How `tune` picks: `kind`, an optional first-token KL cap (nats), the point id when `kind` is `point`."""

    kind: RuleKind = "least-damage"
    max_kl: float | None = None
    point: str | None = None
    # On the held-out prompts: a tie needs its gap's upper 95 % bound under `margin` (None: only a gap
    # resolvably above zero loses, the rule before the margin).
    margin: float | None = MARGIN

    def __post_init__(self) -> None:
        if (self.kind == "point") != (self.point is not None):
            raise RefusalEditError("a point pick names one point id, and only it does")
        if self.point is not None and not POINT_ID.fullmatch(self.point):
            raise RefusalEditError(f"a point id is t<trial number>, e.g. t27; got {self.point!r}")
        if self.max_kl is not None and not self.max_kl > 0:
            raise RefusalEditError(f"the KL cap must be positive, got {self.max_kl:g}")
        if self.margin is not None and not 0 < self.margin < 1:
            raise RefusalEditError(f"the margin is a share of the prompts in (0, 1), got {self.margin:g}")

    @property
    def trial(self) -> int | None:
        """The trial number of a point pick."""
        return None if self.point is None else int(self.point[1:])

    @staticmethod
    def parse_margin(text: str | None) -> float | None:
        """A margin in percentage points (`8`: 0.08), `off` (None), or None: the default (`MARGIN`)."""
        if text is None:
            return MARGIN
        if text.strip().lower() == "off":
            return None
        try:
            return float(text) / 100
        except ValueError:
            raise RefusalEditError(f"a margin is percentage points (e.g. 8) or off; got {text!r}") from None

    @classmethod
    def parse(cls, text: str, max_kl: float | None = None, margin: float | None = MARGIN) -> PickRule:
        """`least-damage`, `fewest-refusals`, `least-damage-under:KL` or a point id (`t27`), with an optional cap
        and the held-out tie's margin."""
        text = text.strip()
        if text.startswith(UNDER):
            try:
                cap = float(text[len(UNDER) :])
            except ValueError:
                raise RefusalEditError(f"{text!r}: expected {UNDER}KL, e.g. {UNDER}0.1") from None
            if max_kl is not None and max_kl != cap:
                raise RefusalEditError(f"two KL caps given ({cap:g} and {max_kl:g}); give one")
            return cls("least-damage", cap, margin=margin)
        if text in ("least-damage", "fewest-refusals"):
            return cls(text, max_kl, margin=margin)  # type: ignore[arg-type]
        if POINT_ID.fullmatch(text):
            return cls("point", max_kl, text, margin)
        raise RefusalEditError(
            f"unknown pick {text!r}: least-damage, fewest-refusals, {UNDER}KL or a point id such as t27"
        )

    def describe(self) -> str:
        cap = "" if self.max_kl is None else f", first-token KL <= {self.max_kl:g}"
        if self.kind == "point":
            return f"the point named: {self.point}"
        if self.kind == "fewest-refusals":
            return f"fewest refused-or-degenerate replies{cap}; ties: less first-token KL, then multi-token KL"
        tie = (
            "cannot be told from the lowest (95% intervals, paired where judged on the same prompts)"
            if self.margin is None
            else f"cannot be told from the lowest on val, and on held-out prompts is within {100 * self.margin:g} "
            f"points of the lowest (the upper end of the gap's 95% interval, paired where judged on the same prompts)"
        )
        damage = "least damage (first-token KL, then multi-token KL)"
        return f"{damage} among the points whose refused-or-degenerate rate {tie}{cap}"


@dataclass
class Judged:
    """Refused-or-degenerate replies of a point on one set of prompts: how many, and which (prompt indices,
    with a hash of the prompt list) where the record keeps them."""

    failures: int
    prompts: int
    failed: frozenset[int] | None = None
    prompt_set: str | None = None

    @property
    def rate(self) -> float:
        return self.failures / self.prompts

    @property
    def ci95(self) -> tuple[float, float]:
        return wilson(self.failures, self.prompts)

    def pairs_with(self, other: Judged) -> bool:
        """Whether both were judged on the same prompts with per-prompt outcomes kept: then they pair up."""
        return (
            self.failed is not None
            and other.failed is not None
            and self.prompt_set is not None
            and self.prompt_set == other.prompt_set
            and self.prompts == other.prompts
        )

    def gap(self, other: Judged) -> tuple[float, float]:
        """The 95 % interval of this rate minus `other`'s: paired (`stats.paired`) where both were judged on
        the same prompts, prompt by prompt - the same prompts fail under edits along one direction, so the
        paired interval is the honest, narrower one -, else Newcombe's for independent samples (old records)."""
        if self.pairs_with(other):
            return paired_sets(self.failed, other.failed, self.prompts)  # type: ignore[arg-type]
        return difference(self.failures, self.prompts, other.failures, other.prompts)

    def text(self) -> str:
        lo, hi = self.ci95
        return f"{100 * self.rate:.1f}% ({self.failures}/{self.prompts}; 95% CI {100 * lo:.1f}-{100 * hi:.1f}%)"


def _judged(failures: int, prompts: int, record: dict[str, Any]) -> Judged:
    failed = record.get("failed")
    if failed is None or len(set(failed)) != failures:  # none kept (an old record), or not these counts
        return Judged(failures, prompts)
    return Judged(failures, prompts, frozenset(failed), record.get("prompt_set"))


def val_numbers(point: dict[str, Any]) -> Judged:
    """A point's refused-or-degenerate replies on the confirmation's val prompts."""
    c = point["confirmed"]
    n = int(c["prompts"])
    return _judged(count(c["refusal_rate"], n) + count(c["degenerate_rate"], n), n, c)


def held_out_numbers(point: dict[str, Any]) -> Judged | None:
    """The same on the prompts no direction of the point was fitted to (`resolved`), when measured."""
    r = point.get("resolved")
    return None if not r else _judged(int(r["refused"]) + int(r["degenerate"]), int(r["prompts"]), r)


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
    how = "paired" if a.pairs_with(b) else "unpaired"
    return f"gap {100 * (a.rate - b.rate):+.1f} pts, {how} 95% CI {100 * lo:+.1f} to {100 * hi:+.1f}"


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
    points: Sequence[dict[str, Any]],
    indices: Sequence[int],
    lowest: int,
    numbers,
    where: str,
    margin: float | None = None,
) -> dict[int, str]:
    """The points that lose to the lowest point, each with why: with no `margin`, those whose rate is resolvably
    above its; with one, those not shown within `margin` of it (the gap's upper 95 % bound above the margin)."""
    base = numbers(points[lowest])
    out = {}
    for i in indices:
        mine = numbers(points[i])
        if i == lowest:
            continue
        gap = mine.gap(base)
        if margin is None and resolvable(gap) and mine.rate > base.rate:
            out[i] = (
                f"refused or degenerate {mine.text()} on {where}, resolvably more than {points[lowest]['id']}'s "
                f"{base.text()} ({_gap_text(mine, base)})"
            )
        elif margin is not None and gap[1] > margin:
            out[i] = (
                f"refused or degenerate {mine.text()} on {where}, not shown within {100 * margin:g} points of "
                f"{points[lowest]['id']}'s {base.text()} ({_gap_text(mine, base)})"
            )
    return out


def _stages(points: Sequence[dict[str, Any]], eligible: list[int], margin: float | None = None) -> _Stages:
    """Val can only rule out (32 prompts cannot show anything within a few points); the held-out prompts
    apply `margin`."""
    lowest_val = _lowest(points, eligible, val_numbers)
    out_val = _above(points, eligible, lowest_val, val_numbers, "the val prompts")
    held = [i for i in eligible if i not in out_val and held_out_numbers(points[i]) is not None]
    if not held:
        return _Stages(eligible, lowest_val, out_val, None, {})
    lowest_held = _lowest(points, held, held_out_numbers)
    out_held = _above(points, held, lowest_held, held_out_numbers, "held-out prompts", margin)
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
    stages = _stages(points, eligible, rule.margin)
    index = min(stages.contenders, key=lambda i: damage(points[i]))
    for i in eligible:
        verdicts[ids[i]] = stages.out_val.get(i) or stages.out_held.get(i) or _more_damage(points[i], points[index])
    verdicts[ids[index]] = "picked: " + _picked_why(points, stages, rule.margin)
    return Picked(index, text, True, verdicts)


def _more_damage(point: dict[str, Any], chosen: dict[str, Any]) -> str:
    (f, m), (fc, mc) = damage(point), damage(chosen)
    return (
        f"refusals not told apart from the lowest, more damage than {chosen['id']}: first-token KL {f:.4f} vs "
        f"{fc:.4f}, multi-token {m:.4f} vs {mc:.4f}"
    )


def _picked_why(points: Sequence[dict[str, Any]], stages: _Stages, margin: float | None) -> str:
    low = points[stages.lowest_val]
    lowest = f"{low['id']}'s {val_numbers(low).text()}"
    why = f"least damage among the points not resolvably above the lowest val rate ({lowest})"
    if stages.lowest_held is None:
        return why
    held = points[stages.lowest_held]
    within = "not resolvably above" if margin is None else f"within {100 * margin:g} points of"
    return f"{why} and {within} the lowest held-out rate ({held['id']}'s {held_out_numbers(held).text()})"  # type: ignore[union-attr]


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
    stages = _stages(points, eligible, rule.margin)
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
