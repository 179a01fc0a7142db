"""Per-layer score plots: one line per post-instruction position, the chosen candidate marked."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from refusal_edit.directions.select import Selection, SelectionSettings

PANELS = (
    ("proxy", "bypass estimate (proxy)", None),
    ("bypass", "bypass score (refusal log-odds, ablated)", None),
    ("induce", "induce score (refusal log-odds, added)", "induce_threshold"),
    ("kl", "KL(base || ablated), harmless", "kl_threshold"),
)


def plot_scores(
    selection: Selection, labels: list[str], n_layers: int, path: Path, settings: SelectionSettings
) -> Path:
    panels = [p for p in PANELS if any(getattr(c, p[0]) is not None for c in selection.candidates)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    n_pos = len(labels)
    for ax, (key, title, threshold) in zip(axes[0], panels, strict=True):
        for p in range(n_pos):
            pos = -(n_pos - p)
            pts = [
                (c.layer, getattr(c, key))
                for c in selection.candidates
                if c.position == pos and getattr(c, key) is not None and not math.isnan(getattr(c, key))
            ]
            if pts:
                xs, ys = zip(*sorted(pts), strict=True)
                # One colour per position in every panel (panels show different subsets of positions).
                ax.plot(xs, ys, marker="o", markersize=3, color=f"C{p}", label=f"{pos} {labels[p]!r}")
        chosen = selection.chosen
        value = getattr(chosen, key)
        if value is not None:
            ax.scatter([chosen.layer], [value], s=120, facecolors="none", edgecolors="red", zorder=5, label="chosen")
        if threshold is not None:
            ax.axhline(getattr(settings, threshold), color="grey", linestyle="--", linewidth=1)
        ax.axvline(settings.max_layer(n_layers) - 0.5, color="grey", linestyle=":", linewidth=1)
        if key == "kl":  # exhaustive runs span decades (symlog); a few scored points read better linear
            kls = [c.kl for c in selection.candidates if c.kl is not None]
            if kls and max(kls) > 100 * max(min(kls), 1e-3):
                ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("layer")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{selection.method} selection: layer {selection.chosen.layer}, position {selection.chosen.position}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
