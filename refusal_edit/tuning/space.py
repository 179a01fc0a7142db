"""The search space of `tune`: Optuna parameters <-> `EditSpec`, and the seed points every study starts from.

Per site (attention, MLP) a kernel over layers - peak weight, peak layer, width, floor (as a fraction of
the peak weight) -, one weight for the embedding, the direction (the selected one, each layer's own, or
one interpolated between layers), and the projected and norm-preserving variants. The seeds put the
paper's edit and a few known-good shapes (a window of layers around the direction's layer, no embedding;
the attention writers alone around it, each with its layer's own direction: on the demo model the
low-damage end of the front is made of such shapes, see the README's side-by-side bench) on the
front from the first trials, so the sampler refines rather than discovers them.
`scaled` gives a point's shape at another strength: the search ends by sweeping its strongest front points
down, which fills the front's low-damage end with shapes that already proved themselves. `between` gives the
points on the way from one point to another: the search also bridges its strongest low-damage shape to the
paper's edit, the front's low-refusal end (see `tuning.run`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from refusal_edit.edits.spec import EditSpec, Strength

MAX_WEIGHT = 1.25  # partial projections past 1 overshoot (flip the component); a little room helps some models
# A trial's user attribute that sets its direction source: the bridge's points use one the sampler does not
# offer (`downstream`), so the sampled trials - and the study's determinism - stay as they were.
BRIDGE_DIRECTION = "bridge_direction"


@dataclass(frozen=True)
class SearchSpace:
    n_layers: int
    direction_layer: int | None  # the selected candidate's layer (its residual-stream index)
    per_layer: bool  # every layer's candidate is available (candidates.safetensors)
    harmless_means: bool  # the projected variant is available
    preserve_norm: bool = True  # offer norm preservation (evaluated on in-memory weights)

    def suggest(self, trial: Any) -> EditSpec:
        """The spec of one Optuna trial."""
        choices = ["chosen", "interpolate", "layer"] if self.per_layer else ["chosen"]
        direction = trial.suggest_categorical("direction", choices)
        direction = trial.user_attrs.get(BRIDGE_DIRECTION, direction)
        index = None
        if direction == "interpolate":
            index = trial.suggest_float("index", max(1.0, 0.3 * self.n_layers), 0.9 * self.n_layers)
        sites = {}
        for site in ("attn", "mlp"):
            weight = trial.suggest_float(f"{site}_weight", 0.0, MAX_WEIGHT)
            peak = trial.suggest_float(f"{site}_peak", 0.0, self.n_layers - 1.0)
            width = trial.suggest_float(f"{site}_width", 1.0, float(self.n_layers))
            floor = trial.suggest_float(f"{site}_floor", 0.0, 1.0)
            flat = floor >= 1.0 or width >= self.n_layers * 2  # the kernel is flat: say so (the paper's edit is)
            sites[site] = Strength(weight=weight) if flat else Strength(weight, peak, width, floor * weight)
        embedding = trial.suggest_float("embedding", 0.0, 1.0)
        projected = trial.suggest_categorical("projected", [False, True]) if self.harmless_means else False
        preserve = trial.suggest_categorical("preserve_norm", [False, True]) if self.preserve_norm else False
        return EditSpec(
            attn=sites["attn"],
            mlp=sites["mlp"],
            embedding=embedding,
            direction=direction,
            index=index,
            projected=projected,
            preserve_norm=preserve,
        )

    def params(
        self,
        weight: float = 1.0,
        mlp: float | None = None,
        peak: float | None = None,
        width: float | None = None,
        floor: float = 1.0,
        embedding: float = 1.0,
        direction: str = "chosen",
        projected: bool = False,
        preserve_norm: bool = False,
    ) -> dict[str, Any]:
        """Optuna parameters of a point (for `enqueue_trial`); defaults: the paper's edit. `mlp`: the MLP
        writers' weight when it differs from the attention writers' `weight`."""
        center = float(self.direction_layer if self.direction_layer is not None else self.n_layers // 2)
        p: dict[str, Any] = {"direction": direction}
        for site in ("attn", "mlp"):
            p[f"{site}_weight"] = mlp if site == "mlp" and mlp is not None else weight
            p[f"{site}_peak"] = min(max(peak if peak is not None else center, 0.0), self.n_layers - 1.0)
            p[f"{site}_width"] = min(max(width if width is not None else float(self.n_layers), 1.0), self.n_layers)
            p[f"{site}_floor"] = floor
        p["embedding"] = embedding
        if self.harmless_means:
            p["projected"] = projected
        if self.preserve_norm:
            p["preserve_norm"] = preserve_norm
        return p

    def seeds(self) -> list[dict[str, Any]]:
        """The paper's edit, then known-good shapes: windows of layers around the direction, no embedding."""
        center = float(self.direction_layer if self.direction_layer is not None else self.n_layers // 2)
        narrow = max(2.0, self.n_layers / 8)
        seeds = [
            self.params(),  # the paper's edit: every writer, weight 1
            self.params(embedding=0.0),
            self.params(peak=center - 2, width=narrow + 1, floor=0.0, embedding=0.0),
            self.params(peak=center - 1, width=2 * narrow, floor=0.0, embedding=0.0),
            self.params(peak=center - 2, width=narrow + 1, floor=0.15, embedding=0.0),
        ]
        if self.preserve_norm:
            seeds.append(self.params(preserve_norm=True))
        if self.harmless_means:
            seeds.append(self.params(peak=center - 2, width=narrow + 1, floor=0.0, embedding=0.0, projected=True))
        if self.per_layer:
            seeds.append(
                self.params(peak=center - 2, width=narrow + 2, floor=0.0, embedding=0.0, mlp=0.0, direction="layer")
            )
        return seeds

    def scaled(self, params: dict[str, Any], factor: float) -> dict[str, Any]:
        """`params` with the attention, MLP and embedding weights times `factor` (kept in their ranges; the
        floors are fractions of the weights, so they scale too): the same shape at another strength."""
        p = dict(params)
        for key in ("attn_weight", "mlp_weight"):
            p[key] = min(max(p[key] * factor, 0.0), MAX_WEIGHT)
        p["embedding"] = min(max(p["embedding"] * factor, 0.0), 1.0)
        return p

    def between(self, start: dict[str, Any], end: dict[str, Any], t: float) -> dict[str, Any]:
        """The point a fraction `t` of the way from `start` to `end`: every number interpolated (weights, kernel
        peaks, widths, floors, the embedding's weight), every choice (direction, variants) kept from `start`."""
        p = dict(start)
        for key, value in start.items():
            other = end.get(key)
            if isinstance(value, float | int) and not isinstance(value, bool) and isinstance(other, float | int):
                p[key] = float(value + t * (float(other) - value))
        return p
