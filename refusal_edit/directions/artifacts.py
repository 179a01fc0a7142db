"""Direction files: safetensors with the unit `direction`, the raw `mean_diff` and string metadata.

Never pickles: a direction downloaded from someone else is data, not code, and is validated as such:
float vectors only, finite, not zero (the norm is taken in float64: values near the float32 maximum are
not "zero"), integer `layer` / `position` metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import refusal_edit.directions.identity as identity
from refusal_edit.edits.spec import EditSpec
from refusal_edit.errors import RefusalEditError
from refusal_edit.linalg import unit
from refusal_edit.loading.cache import sha256_file

DIRECTION_FILE = "direction.safetensors"  # the name extract writes; a run folder given as a direction holds it


@dataclass
class DirectionFile:
    direction: torch.Tensor  # unit vector, float32 [hidden]
    mean_diff: torch.Tensor | None  # raw difference in means, float32 [hidden]
    metadata: dict[str, str] = field(default_factory=dict)
    path: Path | None = None
    sha256: str = ""

    @property
    def layer(self) -> int | None:
        value = self.metadata.get("layer")
        return int(value) if value not in (None, "") else None

    @property
    def source_model(self) -> dict[str, Any] | None:
        """The identity of the model the direction was found in (`directions.identity`); None: not recorded."""
        return identity.read(self.metadata)

    @property
    def n_layers(self) -> int | None:
        """The source model's layer count, where the file records it."""
        value = (self.source_model or {}).get("num_layers")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def position(self) -> int | None:
        value = self.metadata.get("position")
        return int(value) if value not in (None, "") else None

    def edit_vector(self, edit: EditSpec) -> tuple[torch.Tensor, int | None]:
        """What `edit` uses, and where: the unit direction for an ablation (all layers); for an addition the
        raw mean difference (the unit direction with `unit`) at the recorded layer unless `edit.layer` says
        otherwise. The caller applies `coeff`."""
        edit.check()
        if edit.mode == "ablate":
            return self.direction, None
        layer = self.layer if edit.layer is None else edit.layer
        if layer is None:
            raise RefusalEditError("`mode` add needs `layer` (the direction file records none)")
        if not edit.unit and self.mean_diff is None:
            raise RefusalEditError("the direction file has no mean_diff; pass `unit` to add the unit direction")
        return (self.direction if edit.unit else self.mean_diff), layer  # type: ignore[return-value]


def save_direction(path: Path, mean_diff: torch.Tensor, metadata: dict[str, Any]) -> Path:
    """Write `direction` (unit, float32) and `mean_diff` with string metadata."""
    v = mean_diff.detach().float().cpu().contiguous()
    direction = unit(v, "mean_diff").contiguous()
    meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in metadata.items()}
    save_file({"direction": direction, "mean_diff": v}, str(path), metadata=meta)
    return path


def direction_path(path: str | Path) -> Path:
    """The direction file `path` names: the file itself, or `direction.safetensors` in an extract run folder."""
    p = Path(path)
    if p.is_dir():
        if (p / DIRECTION_FILE).is_file():
            return p / DIRECTION_FILE
        if (p / "config.json").is_file():
            raise RefusalEditError(f"{p} is a model directory, not a direction (extract writes {DIRECTION_FILE})")
        raise RefusalEditError(f"no {DIRECTION_FILE} in {p} (give the direction file or the extract run folder)")
    if not p.exists():
        raise RefusalEditError(f"direction file not found: {p}")
    if not p.is_file():
        raise RefusalEditError(f"direction file is not a regular file: {p}")
    return p


def _check_metadata(metadata: dict[str, str], name: str) -> None:
    for key in ("layer", "position"):
        value = metadata.get(key)
        if value in (None, ""):
            continue
        try:
            number = int(value)
        except ValueError:
            raise RefusalEditError(f"{name}: metadata {key}={value!r} is not an integer") from None
        if key == "layer" and number < 0:
            raise RefusalEditError(f"{name}: metadata layer={value!r} is negative")


def _vector(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """The vector in float64 (every float dtype converts; float8 has no `isfinite` of its own)."""
    if tensor.dim() != 1:
        raise RefusalEditError(f"{what} must be a vector, got shape {list(tensor.shape)}")
    if tensor.is_complex() or not tensor.is_floating_point():
        dtype = str(tensor.dtype).removeprefix("torch.")
        raise RefusalEditError(f"{what} must hold floating-point values, not {dtype}")
    values = tensor.double()
    if not torch.isfinite(values).all():
        raise RefusalEditError(f"{what} contains NaN or infinite values")
    return values


def load_direction(path: str | Path) -> DirectionFile:
    """Read and validate a direction file, or the one in an extract run folder (a clear error for every way
    it can be wrong)."""
    p = direction_path(path)
    try:
        with safe_open(str(p), framework="pt") as fh:
            keys = set(fh.keys())
            metadata = dict(fh.metadata() or {})
            if "direction" not in keys:
                raise RefusalEditError(f"{p.name} has no tensor named 'direction' (found: {', '.join(sorted(keys))})")
            raw = fh.get_tensor("direction")
            raw_mean = fh.get_tensor("mean_diff") if "mean_diff" in keys else None
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as exc:
        raise RefusalEditError(f"{p.name} is not a valid safetensors file: {str(exc)[:160]}") from None
    _check_metadata(metadata, p.name)
    try:
        identity.read(metadata)
    except RefusalEditError as exc:
        raise RefusalEditError(f"{p.name}: {exc}") from None
    direction = unit(_vector(raw, "direction"), "direction")  # float64 norm: large values are not "zero"
    mean_diff = _vector(raw_mean, "mean_diff").float() if raw_mean is not None else None
    if mean_diff is not None and not torch.isfinite(mean_diff).all():
        raise RefusalEditError("mean_diff has values beyond the float32 range")
    if mean_diff is not None and mean_diff.shape != direction.shape:
        raise RefusalEditError("mean_diff and direction have different shapes")
    return DirectionFile(direction, mean_diff, metadata, p, sha256_file(p))
