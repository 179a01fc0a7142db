"""What an edit plan reads from a checkpoint: config, tensor names / dtypes / shapes, and small tensors.

Plans are decided from this view alone, so the same plan logic (and the same `ChunkTransform`s) serves a
safetensors directory and a GGUF file: each format provides a `TensorSource` that presents tensors under
their Hugging Face names, in Hugging Face orientation ([out, in] for a Linear) and conventions (a Gemma
norm weight `w`, not llama.cpp's stored `1 + w`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import torch

from refusal_edit.checkpoint.safetensors_io import TensorInfo


class TensorSource(Protocol):
    """A read-only view of a checkpoint for planning (never used to write)."""

    config: dict[str, Any]  # config.json as a dict (HF keys)
    root: Path | None  # a directory transformers can resolve config defaults from, or None

    def infos(self) -> Iterable[TensorInfo]:
        """Every tensor: HF name, dtype code (safetensors codes; quantized formats report the float type
        they are edited in, e.g. "F32"), HF-orientation shape."""
        ...

    def find(self, name: str) -> TensorInfo | None:
        """The tensor called `name`, if present."""
        ...

    def read(self, name: str) -> torch.Tensor:
        """A whole (small) tensor in float32, HF conventions: norm gains, biases."""
        ...
