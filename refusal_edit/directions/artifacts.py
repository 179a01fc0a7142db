"""Direction files: safetensors with the unit `direction`, the raw `mean_diff` and string metadata.

Never pickles: a direction downloaded from someone else is data, not code.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from refusal_edit.errors import RefusalEditError


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
    def position(self) -> int | None:
        value = self.metadata.get("position")
        return int(value) if value not in (None, "") else None

    def edit_vector(
        self, mode: str, coeff: float = 1.0, layer: int | None = None, unit: bool = False, option: str = "--mode"
    ) -> tuple[torch.Tensor, int | None]:
        """What an edit of `mode` uses, and where: the unit direction for `ablate` (all layers); for `add`
        the raw mean difference (the unit direction with `unit`) at the recorded layer unless `layer` says
        otherwise. `option` names the CLI flag in error messages. The caller applies `coeff`."""
        if mode == "ablate":
            if coeff != 1.0:
                raise RefusalEditError(f"--coeff applies to {option} add; ablation removes the direction completely")
            return self.direction, None
        if mode != "add":
            raise RefusalEditError(f"unknown {option.lstrip('-')} {mode!r} (ablate, add)")
        layer = self.layer if layer is None else layer
        if layer is None:
            raise RefusalEditError(f"{option} add needs --layer (the direction file records none)")
        if not unit and self.mean_diff is None:
            raise RefusalEditError("the direction file has no mean_diff; pass --unit to add the unit direction")
        return (self.direction if unit else self.mean_diff), layer  # type: ignore[return-value]


def save_direction(path: Path, mean_diff: torch.Tensor, metadata: dict[str, Any]) -> Path:
    """Write `direction` (unit, float32) and `mean_diff` with string metadata."""
    v = mean_diff.detach().float().cpu().contiguous()
    direction = (v / v.norm()).contiguous()
    meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in metadata.items()}
    save_file({"direction": direction, "mean_diff": v}, str(path), metadata=meta)
    return path


def load_direction(path: str | Path) -> DirectionFile:
    """Read and validate a direction file (a clear error for every way it can be wrong)."""
    p = Path(path)
    if not p.is_file():
        raise RefusalEditError(f"direction file not found: {p}")
    try:
        with safe_open(str(p), framework="pt") as fh:
            keys = set(fh.keys())
            metadata = dict(fh.metadata() or {})
            if "direction" not in keys:
                raise RefusalEditError(f"{p.name} has no tensor named 'direction' (found: {', '.join(sorted(keys))})")
            direction = fh.get_tensor("direction").float()
            mean_diff = fh.get_tensor("mean_diff").float() if "mean_diff" in keys else None
    except SafetensorError as exc:
        raise RefusalEditError(f"{p.name} is not a valid safetensors file: {exc}") from exc
    if direction.dim() != 1:
        raise RefusalEditError(f"direction must be a vector, got shape {list(direction.shape)}")
    if not torch.isfinite(direction).all():
        raise RefusalEditError("direction contains NaN or infinite values")
    norm = direction.norm()
    if norm == 0:
        raise RefusalEditError("direction is the zero vector")
    if mean_diff is not None and mean_diff.shape != direction.shape:
        raise RefusalEditError("mean_diff and direction have different shapes")
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    return DirectionFile(direction / norm, mean_diff, metadata, p, digest)
