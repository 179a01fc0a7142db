"""Pareto fronts, which points to confirm, and the front plot (the pick rule: `tuning.pick`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from refusal_edit.evaluation.stats import count, wilson

T = TypeVar("T")


def pareto(items: Sequence[T], key: Callable[[T], Sequence[float]]) -> list[T]:
    """The items no other item dominates (<= on every objective, < on one); minimisation."""
    values = [tuple(key(i)) for i in items]
    front = []
    for i, a in enumerate(values):
        dominated = any(all(x <= y for x, y in zip(b, a, strict=True)) and b != a for b in values)
        if not dominated:
            front.append(items[i])
    return front


def spread(items: Sequence[T], k: int, key: Callable[[T], float]) -> list[T]:
    """`k` items spread evenly along `key` (the ends always included), in key order."""
    ordered = sorted(items, key=key)
    if len(ordered) <= k:
        return ordered
    if k == 1:
        return [ordered[0]]
    picks = sorted({round(j * (len(ordered) - 1) / (k - 1)) for j in range(k)})
    return [ordered[j] for j in picks]


def _failure_interval(c: dict[str, Any]) -> tuple[float, float]:
    """Wilson 95 % interval of a confirmed point's refused-or-degenerate rate."""
    n = int(c["prompts"])
    return wilson(count(c["refusal_rate"] + c["degenerate_rate"], n), n)


def plot_front(data: dict[str, Any], path: Path) -> Path:
    """front.png: every trial's proxies with the proxy front (left), the confirmed points (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    trials = [t for t in data["trials"] if t.get("kl_proxy") is not None]
    if trials:

        def xy(ts: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
            return [max(t["kl_proxy"], 1e-5) for t in ts], [100 * t["refusal_proxy"] for t in ts]

        front = sorted(pareto(trials, lambda t: (t["refusal_proxy"], t["kl_proxy"])), key=lambda t: t["kl_proxy"])
        confirmed_trials = {p["trial"] for p in data["confirmed"]}
        conf = [t for t in trials if t["number"] in confirmed_trials]
        left.scatter(*xy(trials), s=14, color="0.65", label="trials")
        left.plot(*xy(front), "-o", ms=4, color="tab:blue", label="proxy front")
        left.scatter(*xy(conf), s=60, facecolors="none", edgecolors="tab:red", label="confirmed")
    left.axhline(100 * data["base"]["refusal_proxy"], color="k", ls=":", lw=1, label="base model")
    left.set_xscale("log")
    left.set_xlabel("first-token KL on harmless val prompts (nats, proxy)")
    left.set_ylabel("first-token refusal probability on harmful val prompts (%)")
    left.set_title("search (every trial)")
    left.legend(fontsize=8)

    points = data["confirmed"]
    chosen = data.get("chosen")
    base_rate = 100 * data["base"]["confirmed"]["refusal_rate"]
    right.axhline(base_rate, color="k", ls=":", lw=1, label=f"base model ({base_rate:.0f}% refusals)")
    for marker, kind, label in (("o", "first_token_kl", "first-token KL"), ("s", "multi_token_kl", "multi-token KL")):
        xs = [max(p["confirmed"][kind] or 0.0, 1e-5) for p in points]
        ys = [100 * (p["confirmed"]["refusal_rate"] + p["confirmed"]["degenerate_rate"]) for p in points]
        dots = right.scatter(xs, ys, marker=marker, s=36, label=label, alpha=0.85)
        if kind == "first_token_kl":  # Wilson 95 % intervals: val holds a few dozen prompts
            bounds = [_failure_interval(p["confirmed"]) for p in points]
            low = [y - 100 * lo for y, (lo, _) in zip(ys, bounds, strict=True)]
            high = [100 * hi - y for y, (_, hi) in zip(ys, bounds, strict=True)]
            right.errorbar(xs, ys, yerr=[low, high], fmt="none", ecolor=dots.get_facecolor()[0], alpha=0.4, capsize=2)
    stacked: dict[float, int] = {}  # labels already placed at a refusal rate: stack the next one above them
    for p in points:
        c = p["confirmed"]
        y = 100 * (c["refusal_rate"] + c["degenerate_rate"])
        right.plot([max(c["multi_token_kl"] or 0.0, 1e-5), max(c["first_token_kl"], 1e-5)], [y, y], color="0.8", lw=1)
        label = p["id"] + (" (paper's edit)" if p.get("reference") else " (bridge)" if p.get("bridge") else "")
        key = round(y, 1)
        level = stacked.get(key, 0)
        stacked[key] = level + 1
        right.annotate(
            label,
            (max(c["first_token_kl"], 1e-5), y),
            fontsize=8,
            xytext=(-4, 5 + 10 * level),
            textcoords="offset points",
            ha="right",
        )
    if chosen is not None:
        c = next(p for p in points if p["id"] == chosen)["confirmed"]
        right.scatter(
            [max(c["first_token_kl"], 1e-5)],
            [100 * (c["refusal_rate"] + c["degenerate_rate"])],
            marker="*",
            s=260,
            color="gold",
            edgecolors="k",
            zorder=5,
            label="picked",
        )
    right.set_xscale("log")
    right.set_xlabel("KL on harmless val prompts (nats; greedy continuations, teacher-forced)")
    right.set_ylabel("harmful val prompts refused or degenerate (%)")
    right.set_title("confirmed points (greedy generation; bars: 95% intervals)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
