"""llama.cpp control vectors: the refusal direction as a run-time activation addition (`--control-vector`).

A control vector is a GGUF of architecture `controlvector` holding one F32 vector `direction.N` per block N.
llama.cpp adds `direction.N` (times the strength given at load) to the output of block N (0-based), that is
to the input of block N + 1 - in HF terms to `hidden_states[N + 1]`. The HF path's activation addition at the
input of layer L (`evaluate --mode add`, `orthogonalize --mode add --layer L`) is therefore `direction.(L-1)`.
llama.cpp rejects `direction.0` and never applies a vector to the last block's output slot beyond
`n_layer - 1`, so L runs from 2 to n_layers: the embedding output and the output of block 0 cannot be steered.

A control vector can only add. Directional ablation (removing the component along r from every residual
write, the `orthogonalize` edit) is input-dependent - the amount removed is r . x for each activation x -
so no constant vector expresses it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from refusal_edit import __version__
from refusal_edit.directions.artifacts import DirectionFile
from refusal_edit.edits.spec import EditSpec
from refusal_edit.errors import RefusalEditError
from refusal_edit.gguf.file import GGUFFile
from refusal_edit.gguf.writer import atomic_file

ARCH = "controlvector"
FIRST_LAYER = 2  # input of HF layer 1 would be direction.0, which llama.cpp rejects
BAKE_IT_IN = (
    "bake the addition into the weights: refusal-edit orthogonalize MODEL `orthogonalize.direction` DIRECTION "
    "`orthogonalize.mode` add"
)


def tensor_name(layer: int) -> str:
    """The control-vector tensor that adds at the input of HF layer `layer`."""
    if layer < FIRST_LAYER:
        raise RefusalEditError(
            f"a llama.cpp control vector cannot add at the input of layer {layer} (the first it can steer is layer "
            f"{FIRST_LAYER}: direction.0 is rejected); choose `layers` from {FIRST_LAYER}, or {BAKE_IT_IN}"
        )
    return f"direction.{layer - 1}"


def parse_layers(text: str | None, default: int | None, n_layers: int | None) -> list[int]:
    """HF layers whose input receives the vector: `A:B` is layers A..B-1, `A` one layer; default: `default`."""
    if text is None or not text.strip():
        if default is None:
            raise RefusalEditError("the direction file records no layer; give `layers` (e.g. 10:16)")
        if default < FIRST_LAYER:
            raise RefusalEditError(
                f"extract chose layer {default}, and a llama.cpp control vector cannot add at the input of layer 0 "
                f"or 1 (direction.0 is rejected): pass `layers` {FIRST_LAYER} (or later), or {BAKE_IT_IN}"
            )
        layers = [default]
    else:
        start, sep, stop = text.strip().partition(":")
        try:
            a = int(start) if start.strip() else FIRST_LAYER
            if not sep:
                b = a + 1
            elif stop.strip():
                b = int(stop)
            elif n_layers is not None:
                b = n_layers + 1
            else:
                raise RefusalEditError("`layers` A: (to the end) needs `model` to know the number of layers")
        except ValueError:
            raise RefusalEditError(f"cannot read `layers` {text!r} (A:B for layers A..B-1, or one layer)") from None
        layers = list(range(a, b))
        if not layers:
            raise RefusalEditError(f"`layers` {text!r} selects no layer")
    if n_layers is not None and layers[-1] > n_layers:
        raise RefusalEditError(
            f"`layers` {text or layers[-1]} is out of range: the model has {n_layers} layers (a control vector "
            f"steers the inputs of layers {FIRST_LAYER} to {n_layers})"
        )
    for layer in layers:
        tensor_name(layer)
    return layers


@dataclass
class ControlVector:
    out: Path
    layers: list[int]  # HF layers whose input receives the vector
    tensors: list[str]  # direction.N, one per layer
    norm: float  # norm of each added vector (coeff included)
    metadata: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def write_control_vector(
    direction: DirectionFile,
    out: Path,
    coeff: float = 1.0,
    layers: str | None = None,
    unit: bool = False,
    model: Path | None = None,
    force: bool = False,
    replace_any: bool = False,
) -> ControlVector:
    """Write `coeff` x the direction file's addition vector (the raw mean difference; the unit direction with
    `unit`) as a llama.cpp control vector adding at the input of `layers` (default: the direction's layer).
    `model` (a GGUF) checks the hidden size and layer range and names the model in the file's hint; without
    it the layer range is the one the direction file records (`source_model`), where it does."""
    from gguf import GGUFWriter

    if not np.isfinite(coeff):
        raise RefusalEditError(f"`coeff` must be a finite number, got {coeff}")
    vector, _ = direction.edit_vector(EditSpec(mode="add", layer=direction.layer or 0, unit=unit))
    values = (coeff * vector.detach().float().numpy()).astype(np.float32)
    hint, n_layers = str(direction.metadata.get("model", "")), direction.n_layers
    if model is not None:
        gguf = GGUFFile(Path(model))
        hint = gguf.arch
        n_layers = gguf.value(f"{gguf.arch}.block_count")
        hidden = gguf.value(f"{gguf.arch}.embedding_length")
        if n_layers is None:
            n_layers = direction.n_layers
        if hidden is not None and int(hidden) != values.size:
            raise RefusalEditError(f"the direction has size {values.size}, {gguf.path.name} has hidden size {hidden}")
    chosen = parse_layers(layers, direction.layer, int(n_layers) if n_layers is not None else None)
    names = [tensor_name(layer) for layer in chosen]
    meta = {
        "tool": "refusal-edit",
        "tool_version": __version__,
        "coeff": coeff,
        "unit": unit,
        "layers": chosen,
        "direction_file": direction.path.name if direction.path else None,
        "direction_sha256": direction.sha256 or None,
        "direction_layer": direction.layer,
        "direction_model": direction.metadata.get("model"),
    }
    inputs = tuple(p for p in (direction.path, model) if p)
    with atomic_file(Path(out), force=force, inputs=inputs, replace_any=replace_any) as tmp:
        w = GGUFWriter(str(tmp), ARCH)
        w.add_string(f"{ARCH}.model_hint", hint or "unknown")
        w.add_int32(f"{ARCH}.layer_count", len(names))
        w.add_string("refusal_edit.record", json.dumps(meta))
        for name in names:
            w.add_tensor(name, values)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    notes = []
    if n_layers is None:
        notes.append(
            "the direction file records no layer count (an older file): the layers were not checked against the "
            "model; give `model` (its GGUF) to check them"
        )
    return ControlVector(Path(out), chosen, names, float(np.linalg.norm(values)), meta, notes)


def read_control_vector(path: Path) -> dict[int, np.ndarray]:
    """HF layer -> summed vector of a control-vector GGUF, by llama.cpp's loading rules (for checks)."""
    gguf = GGUFFile(Path(path))
    if gguf.arch != ARCH:
        raise RefusalEditError(f"{gguf.path.name} is a {gguf.arch} GGUF, not a control vector")
    out: dict[int, np.ndarray] = {}
    for t in gguf.tensors.values():
        head, _, index = t.name.partition(".")
        if head != "direction" or not index.isdigit() or int(index) == 0:
            raise RefusalEditError(f"{gguf.path.name}: invalid control-vector tensor {t.name}")
        if t.qtype.name != "F32" or len(t.ne) != 1:
            raise RefusalEditError(f"{gguf.path.name}: {t.name} must be a 1-D F32 tensor")
        vec = gguf.rows(t, 0, 1).view(np.float32).reshape(-1).copy()
        layer = int(index) + 1
        out[layer] = out[layer] + vec if layer in out else vec
    return out
