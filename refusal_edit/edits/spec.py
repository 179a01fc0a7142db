"""Edit variants as data: which direction each residual writer loses, and how much of it.

An `EditSpec` is JSON (it travels in `front.json`, the edit record and the model card) and describes a
whole family of edits:
- strength per layer and site: `attn` and `mlp` are `Strength`s (a kernel - peak layer, peak weight,
  width, floor - or an explicit list); `embedding` is one weight. Partial projection W - a u u^T W.
- direction per layer: the selected direction everywhere (`chosen`), each layer's own candidate
  (`layer`), the selected direction up to its own layer and each later layer's own candidate after it
  (`downstream`), or one interpolated between two layers' candidates (`interpolate`);
- `projected`: the direction minus its component along the harmless mean at its layer (renormalised);
- `rank` > 1: the span of several orthonormalised candidates (other positions or neighbouring layers);
- `preserve_norm`: rescale every written vector to its original norm (no hook twin exists for it);
- `mode` add instead: the baked activation addition of `coeff` times the direction file's vector (`unit`:
  its unit direction) at `layer` (default: the direction's own) and `site` (default: the input), one edit
  of the plain direction (no variant fields).

`EditSpec` is the one value that describes an edit, from the options to the writers, the hooks and the
record. `resolve` derives from an ablation spec and a `DirectionBank` its `WriterBases`: an orthonormal basis
and a weight per writer site, in the residual basis (the sandwich-norm rule is applied later by whoever knows
the gains: the weight plan from the checkpoint, the hooks from the loaded model) - the geometry the planner
and the hooks apply, not a second description of the edit. The plain edit of the paper is `EditSpec()`: the
chosen direction, weight 1 everywhere.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

import torch

from refusal_edit.errors import RefusalEditError
from refusal_edit.linalg import orthonormal, unit

DirectionSource = Literal["chosen", "layer", "downstream", "interpolate"]
DIRECTION_SOURCES: tuple[str, ...] = get_args(DirectionSource)
BasisSource = Literal["positions", "layers"]
MODES = ("ablate", "add")
SITES = ("input", "attn")
# The fields of an addition (and the mode that selects it): what the direction edit of `chat` and
# `evaluate` takes besides the variant fields.
DIRECTION_FIELDS = ("mode", "coeff", "layer", "site", "unit")
MIN_RELATIVE_NORM = 1e-3  # a candidate this much smaller than the chosen one carries no usable direction


@dataclass(frozen=True)
class Strength:
    """Ablation weight per layer: `weight` at layer `peak`, falling linearly to `floor` at `width` layers
    away and staying there; `width = inf` is a flat `weight`. A window [`start`, `stop`) has `weight` inside
    and `floor` outside. `per_layer` (one weight per layer) wins when given."""

    weight: float = 1.0
    peak: float = 0.0
    width: float = math.inf
    floor: float = 0.0
    start: int | None = None
    stop: int | None = None
    per_layer: tuple[float, ...] | None = None

    def alpha(self, layer: int, n_layers: int) -> float:
        if self.per_layer is not None:
            if len(self.per_layer) != n_layers:
                raise RefusalEditError(f"per-layer weights give {len(self.per_layer)} values for {n_layers} layers")
            return float(self.per_layer[layer])
        if self.start is not None or self.stop is not None:
            lo = 0 if self.start is None else self.start
            hi = n_layers if self.stop is None else self.stop
            return self.weight if lo <= layer < hi else self.floor
        if math.isinf(self.width):
            return self.weight
        if self.width <= 0:
            return self.weight if layer == self.peak else self.floor
        t = max(0.0, 1.0 - abs(layer - self.peak) / self.width)
        return self.floor + (self.weight - self.floor) * t

    @classmethod
    def window(cls, start: int | None, stop: int | None, weight: float = 1.0) -> Strength:
        """`weight` on layers [start, stop), nothing elsewhere (the `layers A:B` case)."""
        return cls(weight=weight, start=start, stop=stop)

    def check(self, n_layers: int | None = None) -> None:
        values = [self.weight, self.floor, self.peak, *(self.per_layer or ())]
        if not all(math.isfinite(v) for v in values) or math.isnan(self.width):
            raise RefusalEditError("strength values must be finite numbers")
        if self.start is not None and self.stop is not None and self.start >= self.stop:
            raise RefusalEditError(f"an empty layer window {self.start}:{self.stop}")
        if n_layers is not None and (
            (self.start is not None and not 0 <= self.start < n_layers)
            or (self.stop is not None and not 0 < self.stop <= n_layers)
        ):
            window = f"{'' if self.start is None else self.start}:{'' if self.stop is None else self.stop}"
            raise RefusalEditError(
                f"`layers` {window} is out of range: the model has {n_layers} layers (0:{n_layers} selects them all)"
            )

    def to_json(self) -> dict[str, Any]:
        if self.per_layer is not None:
            return {"per_layer": list(self.per_layer)}
        if self.start is not None or self.stop is not None:
            return {"weight": self.weight, "start": self.start, "stop": self.stop, "floor": self.floor}
        if math.isinf(self.width):
            return {"weight": self.weight}
        return {"weight": self.weight, "peak": self.peak, "width": self.width, "floor": self.floor}

    @classmethod
    def from_json(cls, data: Any) -> Strength:
        if isinstance(data, int | float) and not isinstance(data, bool):
            return cls(weight=float(data))
        if not isinstance(data, dict):
            raise RefusalEditError(f"a strength is a number or an object, not {type(data).__name__}")
        if "per_layer" in data:
            values = data["per_layer"]
            if not isinstance(values, list) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in values
            ):
                raise RefusalEditError("per_layer must be a list of numbers")
            return cls(per_layer=tuple(float(v) for v in values))
        known = {"weight", "peak", "width", "floor", "start", "stop"}
        extra = set(data) - known
        if extra:
            raise RefusalEditError(f"unknown strength keys: {', '.join(sorted(extra))}")
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key in ("start", "stop"):
                if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                    raise RefusalEditError(f"strength {key} must be a layer number")
                values[key] = value
            elif isinstance(value, bool) or not isinstance(value, int | float):
                raise RefusalEditError(f"strength {key} must be a number")
            else:
                values[key] = float(value)
        strength = cls(**values)
        strength.check()
        return strength


FULL = Strength()


@dataclass(frozen=True)
class EditSpec:
    """One edit of the family (see the module docstring); `EditSpec()` is the paper's ablation."""

    attn: Strength = FULL
    mlp: Strength = FULL
    embedding: float = 1.0
    direction: DirectionSource = "chosen"
    index: float | None = None  # interpolate: fractional layer whose candidate is used
    position: int | None = None  # post-instruction position of the candidates (default: the chosen one's)
    projected: bool = False
    rank: int = 1
    basis: BasisSource = "positions"
    preserve_norm: bool = False
    mode: str = "ablate"
    coeff: float = 1.0  # add: the multiple of the direction file's vector
    layer: int | None = None  # add: the layer it goes to (default: the direction's own)
    site: str | None = None  # add: input (default) or attn
    unit: bool = False  # add: the unit direction instead of the mean difference

    @property
    def has_hook_twin(self) -> bool:
        """Norm preservation rescales weights per input unit: no activation hook computes the same thing."""
        return not self.preserve_norm

    @property
    def is_variant(self) -> bool:
        """Whether the ablation differs from the paper's plain one (planned from the direction bank)."""
        plain = EditSpec(mode=self.mode, coeff=self.coeff, layer=self.layer, site=self.site, unit=self.unit)
        return self != plain

    def check(self) -> EditSpec:
        """The spec, checked: an addition takes no variant field, and an ablation none of the addition's
        options (`coeff`, `layer`, `site`, `unit`): never silently ignored."""
        if self.mode not in MODES:
            raise RefusalEditError(f"unknown `mode` {self.mode!r} ({', '.join(MODES)})")
        if self.site is not None and self.site not in SITES:
            raise RefusalEditError(f"unknown `site` {self.site!r} ({', '.join(SITES)})")
        if self.mode == "ablate":
            given = [name for name in DIRECTION_FIELDS[1:] if getattr(self, name) != getattr(FULL_ABLATION, name)]
            if given:
                names = " and ".join(f"`{n}`" for n in given)
                raise RefusalEditError(
                    f"{names} {'applies' if len(given) == 1 else 'apply'} to `mode` add; "
                    "ablation removes the unit direction from every layer completely"
                )
        elif not math.isfinite(self.coeff):
            raise RefusalEditError(f"`coeff` must be a finite number, got {self.coeff}")
        elif self.is_variant:
            raise RefusalEditError("`spec` describes an ablation variant; it does not combine with `mode` add")
        if self.direction not in DIRECTION_SOURCES:
            raise RefusalEditError(f"unknown direction source {self.direction!r} ({', '.join(DIRECTION_SOURCES)})")
        if self.direction == "interpolate" and self.index is None:
            raise RefusalEditError("an interpolated direction needs `index` (a fractional layer)")
        if self.rank < 1:
            raise RefusalEditError(f"rank must be at least 1, got {self.rank}")
        if self.basis not in ("positions", "layers"):
            raise RefusalEditError(f"unknown basis {self.basis!r} (positions, layers)")
        if not math.isfinite(self.embedding):
            raise RefusalEditError("the embedding weight must be finite")
        self.attn.check()
        self.mlp.check()
        return self

    def to_json(self) -> dict[str, Any]:
        """As JSON; an ablation without the addition's fields (as every front and record before had it)."""
        d = asdict(self)
        d["attn"], d["mlp"] = self.attn.to_json(), self.mlp.to_json()
        if self.mode == "ablate":
            for name in DIRECTION_FIELDS:
                del d[name]
        return d

    @classmethod
    def from_json(cls, data: Any) -> EditSpec:
        if not isinstance(data, dict):
            raise RefusalEditError("an edit spec is a JSON object")
        fields = set(cls.__dataclass_fields__)
        extra = set(data) - fields
        if extra:
            raise RefusalEditError(f"unknown edit spec keys: {', '.join(sorted(extra))}")
        values = dict(data)
        for key in ("attn", "mlp"):
            if key in values:
                values[key] = Strength.from_json(values[key])
        try:
            spec = cls(**values)
        except TypeError as exc:
            raise RefusalEditError(f"invalid edit spec: {exc}") from None
        spec.check()
        return spec

    def describe(self) -> str:
        """One line for tables and notes."""
        parts = [f"direction {self.direction}" + (f" {self.index:.2f}" if self.index is not None else "")]
        for name, s in (("attn", self.attn), ("mlp", self.mlp)):
            if s.per_layer is not None:
                parts.append(f"{name} per-layer")
            elif s.start is not None or s.stop is not None:
                window = f"{'' if s.start is None else s.start}:{'' if s.stop is None else s.stop}"
                parts.append(
                    f"{name} {s.weight:.2f} on layers {window}" + (f", {s.floor:.2f} elsewhere" if s.floor else "")
                )
            elif math.isinf(s.width):
                parts.append(f"{name} {s.weight:.2f}")
            else:
                parts.append(f"{name} {s.weight:.2f}@{s.peak:.1f}±{s.width:.1f} floor {s.floor:.2f}")
        parts.append(f"embedding {self.embedding:.2f}")
        if self.projected:
            parts.append("projected")
        if self.rank > 1:
            parts.append(f"rank {self.rank} ({self.basis})")
        if self.preserve_norm:
            parts.append("norm-preserving")
        return ", ".join(parts)


FULL_ABLATION = EditSpec()


def describe_variant(record_spec: dict[str, Any] | None) -> str | None:
    """A record's edit variant (`EditRecord.spec`) in words for its card; None without a valid one (a
    variant of a newer version: the card shows its JSON)."""
    if not record_spec:
        return None
    try:
        return EditSpec.from_json(record_spec.get("edit")).describe()
    except RefusalEditError:
        return None


@dataclass
class DirectionBank:
    """The vectors an edit can draw on: the selected direction and, when extraction saved them, every
    candidate (difference in means [positions, layers + 1, H]) and the harmless means (same shape)."""

    chosen: torch.Tensor  # [H], any norm
    position: int | None = None  # negative post-instruction position of the chosen candidate
    layer: int | None = None
    mean_diff: torch.Tensor | None = None
    harmless_mean: torch.Tensor | None = None

    @property
    def hidden(self) -> int:
        return self.chosen.numel()

    def candidate(self, position: int, layer: int) -> torch.Tensor:
        md = self._need("mean_diff")
        n_pos = md.shape[0]
        if not -n_pos <= position < 0:
            raise RefusalEditError(f"position {position} is outside the saved candidates (-{n_pos} .. -1)")
        if not 0 <= layer < md.shape[1]:
            raise RefusalEditError(f"layer {layer} is outside the saved candidates (0 .. {md.shape[1] - 1})")
        return md[n_pos + position, layer].float()

    def harmless(self, position: int, layer: int) -> torch.Tensor:
        hm = self._need("harmless_mean")
        return hm[hm.shape[0] + position, layer].float()

    def _need(self, what: str) -> torch.Tensor:
        value = getattr(self, what)
        if value is None:
            raise RefusalEditError(
                f"this edit needs every layer's candidate ({what}); extract saves them in candidates.safetensors "
                "next to direction.safetensors"
            )
        return value


@dataclass
class WriterBases:
    """What `resolve` derives from an ablation spec on one bank: per writer site, an orthonormal basis [k, H]
    (residual basis, before any sandwich-norm rule) and a weight. Keys: ("embedding", None) and (site, layer)
    for site in attn / mlp. `preserve_norm` is the spec's (how the weights apply it)."""

    n_layers: int
    bases: dict[tuple[str, int | None], torch.Tensor] = field(default_factory=dict)
    alphas: dict[tuple[str, int | None], float] = field(default_factory=dict)
    preserve_norm: bool = False
    notes: list[str] = field(default_factory=list)

    def at(self, site: str, layer: int | None) -> tuple[torch.Tensor, float]:
        key = (site, None if site == "embedding" else layer)
        return self.bases[key], self.alphas[key]


def full_ablation(direction: torch.Tensor, n_layers: int) -> WriterBases:
    """The paper's edit: remove the direction completely from every writer."""
    return resolve(EditSpec(), DirectionBank(direction), n_layers)


def _project_out(r: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """r minus its component along `mean` (grimjim's projected abliteration), renormalised."""
    m = unit(mean, "harmless mean")
    return r - (r @ m) * m


def _usable(v: torch.Tensor, reference: torch.Tensor) -> bool:
    return bool(torch.isfinite(v).all()) and float(v.norm()) > MIN_RELATIVE_NORM * float(reference.norm())


def resolve(spec: EditSpec, bank: DirectionBank, n_layers: int) -> WriterBases:
    """The basis and weight of every writer site for `spec` (see the module docstring)."""
    spec.check()
    spec.attn.check(n_layers)
    spec.mlp.check(n_layers)
    position = spec.position if spec.position is not None else bank.position
    needs_bank = spec.direction != "chosen" or spec.projected or spec.rank > 1 or spec.position is not None
    if needs_bank and position is None:
        raise RefusalEditError("this edit needs the chosen candidate's position (missing from the direction file)")
    out = WriterBases(n_layers, preserve_norm=spec.preserve_norm)
    chosen = bank.chosen.float()
    if spec.position is not None and bank.layer is not None:
        chosen = bank.candidate(position, bank.layer)  # type: ignore[arg-type]

    def leading(stream_layer: int | None) -> tuple[torch.Tensor, int | None]:
        """The direction used for writers into residual stream `stream_layer` (None: embeddings), and the
        candidate layer it came from (for projection and subspaces)."""
        if spec.direction == "interpolate":
            assert spec.index is not None
            index = min(max(spec.index, 0.0), float(bank._need("mean_diff").shape[1] - 1))
            lo, hi = math.floor(index), math.ceil(index)
            w = index - lo
            a, b = bank.candidate(position, lo), bank.candidate(position, hi)  # type: ignore[arg-type]
            ok_a, ok_b = _usable(a, chosen), _usable(b, chosen)
            if not (ok_a or ok_b):
                out.notes.append(f"the candidates at layers {lo} and {hi} are ~0; the chosen direction is used")
                return chosen, bank.layer
            if not (ok_a and ok_b):  # one end carries no direction (e.g. the embedding at a template token)
                return (a, lo) if ok_a else (b, hi)
            return unit(a) * (1 - w) + unit(b) * w, round(index)
        if spec.direction == "chosen" or stream_layer is None:
            return chosen, bank.layer
        if spec.direction == "downstream":
            # Upstream of the selected layer each layer's own candidate is fitted to the same few prompts but
            # generalises worse than the selected one (bench/confirm.py --cross-fit on the demo model: t26's
            # weights refuse as often as the paper's edit with the selected direction upstream, more without).
            if bank.layer is None:
                raise RefusalEditError("a downstream direction needs the chosen candidate's layer")
            if stream_layer <= bank.layer:
                return chosen, bank.layer
        v = bank.candidate(position, stream_layer)  # type: ignore[arg-type]
        if _usable(v, chosen):
            return v, stream_layer
        out.notes.append(f"layer {stream_layer}: its own candidate is ~0; the chosen direction is used")
        return chosen, bank.layer

    cache: dict[int | None, torch.Tensor] = {}

    def basis_for(stream_layer: int | None) -> torch.Tensor:
        key = stream_layer if spec.direction in ("layer", "downstream") else None
        if key in cache:
            return cache[key]
        r, src_layer = leading(stream_layer)
        r = unit(r)
        if spec.projected:
            if src_layer is None:
                raise RefusalEditError("a projected direction needs the chosen candidate's layer")
            r = unit(_project_out(r, bank.harmless(position, src_layer)))  # type: ignore[arg-type]
        rows = [r]
        if spec.rank > 1:
            rows += _extra_rows(spec, bank, position, src_layer)  # type: ignore[arg-type]
        basis = orthonormal(torch.stack(rows))[: spec.rank]
        if basis.shape[0] < spec.rank:
            out.notes.append(f"rank {spec.rank} asked, the candidates span {basis.shape[0]} dimensions")
        cache[key] = basis
        return basis

    unit(chosen)  # a clear error for a zero or non-finite direction before anything else
    out.bases["embedding", None] = basis_for(None)
    out.alphas["embedding", None] = float(spec.embedding)
    for layer in range(n_layers):
        basis = basis_for(layer + 1)  # layer l's writers write into the stream that enters layer l + 1
        for site, strength in (("attn", spec.attn), ("mlp", spec.mlp)):
            out.bases[site, layer] = basis
            out.alphas[site, layer] = strength.alpha(layer, n_layers)
    return out


def _extra_rows(spec: EditSpec, bank: DirectionBank, position: int, layer: int | None) -> list[torch.Tensor]:
    """Further candidates for a rank-k subspace: the other post-instruction positions at the same layer
    (largest first), or the neighbouring layers at the same position (nearest first)."""
    md = bank._need("mean_diff")
    if layer is None:
        raise RefusalEditError("a subspace edit needs the chosen candidate's layer")
    if spec.basis == "positions":
        others = [p for p in range(-md.shape[0], 0) if p != position]
        vecs = [bank.candidate(p, layer) for p in others]
        vecs.sort(key=lambda v: -float(v.norm()))
    else:
        order = sorted((abs(i - layer), i) for i in range(md.shape[1]) if i != layer)
        vecs = [bank.candidate(position, i) for _, i in order]
    ref = bank.candidate(position, layer)
    return [unit(v) for v in vecs if _usable(v, ref)]


def parse_layers(text: str) -> tuple[int | None, int | None]:
    """`A:B` -> (A, B) (either side may be empty), `A` -> (A, A + 1); a clear error otherwise."""
    start_text, sep, stop_text = text.partition(":")
    try:
        start = int(start_text) if start_text.strip() else None
        stop = int(stop_text) if stop_text.strip() else None
    except ValueError:
        raise RefusalEditError(f"cannot read `layers` {text!r} (e.g. 12:17, 12:, :8)") from None
    if not sep:
        if start is None:
            raise RefusalEditError(f"cannot read `layers` {text!r} (e.g. 12:17, 12:, :8)")
        stop = start + 1
    if (start is not None and start < 0) or (stop is not None and stop < 0):
        raise RefusalEditError(f"`layers` {text!r}: layers are counted from 0")
    return start, stop


def variant(
    layers: str | None = None,
    weight: float | None = None,
    direction: str | None = None,
    projected: bool = False,
    rank: int = 1,
    basis: str = "positions",
    preserve_norm: bool = False,
) -> EditSpec | None:
    """The spec that simple options describe, or None when they describe the paper's plain edit.

    `layers` A:B limits the edit to the writers of those layers (the embedding only when A is 0 or empty);
    `weight` is a partial projection everywhere edited; `direction` `layer` uses each layer's own candidate.
    """
    plain = layers is None and weight is None and direction in (None, "chosen") and rank == 1
    if plain and not projected and not preserve_norm:
        return None
    w = 1.0 if weight is None else float(weight)
    start, stop = parse_layers(layers) if layers is not None else (None, None)
    strength = Strength.window(start, stop, w) if layers is not None else Strength(weight=w)
    spec = EditSpec(
        attn=strength,
        mlp=strength,
        embedding=w if not start else 0.0,
        direction=direction or "chosen",  # type: ignore[arg-type]
        projected=projected,
        rank=rank,
        basis=basis,  # type: ignore[arg-type]
        preserve_norm=preserve_norm,
    )
    spec.check()
    return spec
