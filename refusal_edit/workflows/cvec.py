"""The `export-cvec` workflow: a direction file (or an extract run folder) as a llama.cpp control vector."""

from __future__ import annotations

from pathlib import Path

from refusal_edit.directions.artifacts import direction_path, load_direction
from refusal_edit.gguf.cvec import ControlVector, write_control_vector


def export_cvec(
    direction: str | Path,
    out: Path,
    coeff: float = 1.0,
    layers: str | None = None,
    unit: bool = False,
    model: Path | None = None,
    force: bool = False,
    replace_any: bool = False,
) -> ControlVector:
    """Write `coeff` x the direction's addition vector as a control vector (`gguf.cvec.write_control_vector`)."""
    d = load_direction(direction_path(direction))
    return write_control_vector(
        d, out, coeff=coeff, layers=layers, unit=unit, model=model, force=force, replace_any=replace_any
    )
