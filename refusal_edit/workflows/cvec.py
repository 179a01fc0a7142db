"""The `export-cvec` workflow: a direction file (or an extract run folder) as a llama.cpp control vector."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from refusal_edit.directions.artifacts import direction_path, load_direction
from refusal_edit.gguf.cvec import ControlVector, write_control_vector


def export_cvec(direction: str | Path, out: Path, **options: Any) -> ControlVector:
    """Write the direction's addition vector as a control vector; `options` (coeff, layers, unit, model, force,
    replace_any) as `gguf.cvec.write_control_vector` takes them."""
    return write_control_vector(load_direction(direction_path(direction)), out, **options)
