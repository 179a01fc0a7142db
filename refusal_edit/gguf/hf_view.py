"""A GGUF file as a `TensorSource`: the edit plan sees HF names, HF shapes and HF conventions.

- names: GGUF tensors under their HF parameter names (`blk.3.attn_output.weight` is
  `model.layers.3.self_attn.o_proj.weight`); tensors without one keep their GGUF name (no rule matches them);
- shapes: GGUF dims reversed (`ne0` is the contiguous, last HF axis), so dim 0 of the HF shape is the axis
  the plan's chunk transforms run along, and a chunk of HF dim-0 rows is a run of whole stored rows;
- dtypes: quantized tensors report "F32", the type they are edited in (the writer requantizes);
- conventions: llama.cpp's converter stores a Gemma RMSNorm gain as `1 + w`; `read` returns HF's `w`
  (the architecture table's `norm_offset` says which models), as transformers' GGUF loader does.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import refusal_edit.gguf.quants as quants
from refusal_edit.arch import ArchSpec
from refusal_edit.checkpoint.safetensors_io import ITEMSIZE, TensorInfo
from refusal_edit.derive import resolve_spec
from refusal_edit.errors import RefusalEditError
from refusal_edit.gguf.file import GGUFFile, GGUFTensor
from refusal_edit.gguf.names import hf_config, weights_map

_PLAIN_CODES = {"F32": "F32", "F16": "F16", "BF16": "BF16", "F64": "F64", "I8": "I8", "I16": "I16", "I32": "I32"}


class GGUFSource:
    """A GGUF file opened for planning an edit (see module docstring); `gguf` is the file for the writer."""

    def __init__(self, path: str | Path) -> None:
        self.gguf = GGUFFile(Path(path))
        self.path = self.gguf.path
        parts = self.gguf.value("split.count", 1)
        if isinstance(parts, int) and parts > 1:
            raise RefusalEditError(
                f"{self.path.name} is part of a split GGUF ({parts} files); merge them first "
                "(llama-gguf-split --merge FIRST-PART OUT.gguf) and edit the merged file"
            )
        self.config: dict[str, Any] = hf_config(self.gguf)
        self.root: Path | None = None
        self.spec: ArchSpec = resolve_spec(self.config)  # a derived spec: of this structure
        mapping = weights_map(self.gguf, self.config)
        counts = Counter(mapping[n] for n in self.gguf.tensors if n in mapping)
        self.hf_of: dict[str, str] = {}  # GGUF name -> the name the plan sees
        for name in self.gguf.tensors:
            hf = mapping.get(name)
            self.hf_of[name] = hf if hf is not None and counts[hf] == 1 else name
        self.gguf_of: dict[str, str] = {hf: g for g, hf in self.hf_of.items()}
        for g, hf in mapping.items():  # parameters the file lacks (a tied head): where they would go
            self.gguf_of.setdefault(hf, g)
        self._infos = {self.hf_of[t.name]: _info(self.hf_of[t.name], t) for t in self.gguf.tensors.values()}

    def infos(self) -> Iterable[TensorInfo]:
        return self._infos.values()

    def find(self, name: str) -> TensorInfo | None:
        return self._infos.get(name)

    def tensor(self, name: str) -> GGUFTensor:
        """The GGUF tensor the plan calls `name`."""
        return self.gguf.tensors[self.gguf_of[name]]

    def read(self, name: str) -> torch.Tensor:
        if name not in self._infos:
            raise RefusalEditError(f"missing tensor {name}")
        t = self.tensor(name)
        values = quants.dequantize(self.gguf.rows(t, 0, t.n_rows), t.qtype, t.row_size).reshape(t.hf_shape)
        if self.spec.norm_offset and t.name.endswith("norm.weight"):
            values = values - np.float32(self.spec.norm_offset)
        return torch.from_numpy(np.array(values, dtype=np.float32))


def _info(name: str, t: GGUFTensor) -> TensorInfo:
    dtype = _PLAIN_CODES.get(t.qtype.name, "F32")
    return TensorInfo(name, dtype, t.hf_shape, 0, math.prod(t.ne) * ITEMSIZE[dtype])
