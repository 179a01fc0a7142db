"""Read a GGUF file for editing: validated header, metadata as raw entries, tensors as byte ranges.

The header is parsed here rather than with gguf-py's `GGUFReader`, which builds a numpy array for every
string of every metadata array: 16 s for the demo model's 150k-token vocabulary and merges, most of a whole
edit. An editor needs less: where each metadata entry starts and ends (entries are copied verbatim, so keys
keep their types and order), the few values it reads (decoded on demand), the tensor infos, and clear errors
for a file that is not a GGUF, is truncated, or is big-endian. gguf-py still provides the format's constants
(value types, quant types and their block sizes). Tensor data is read from a read-only memory map.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType

from refusal_edit.errors import RefusalEditError

V = GGUFValueType
_SCALARS = {
    V.UINT8: "<B",
    V.INT8: "<b",
    V.UINT16: "<H",
    V.INT16: "<h",
    V.UINT32: "<I",
    V.INT32: "<i",
    V.FLOAT32: "<f",
    V.BOOL: "<?",
    V.UINT64: "<Q",
    V.INT64: "<q",
    V.FLOAT64: "<d",
}
DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: GGUF name, ggml type, dims with `ne0` (the contiguous one) first."""

    name: str
    qtype: GGMLQuantizationType
    ne: tuple[int, ...]
    offset: int  # absolute file offset of the data
    nbytes: int

    @property
    def hf_shape(self) -> tuple[int, ...]:
        """The shape in Hugging Face orientation ([out, in] for a Linear): the dims reversed."""
        return tuple(reversed(self.ne))

    @property
    def row_size(self) -> int:
        """Values per stored row (`ne0`)."""
        return self.ne[0] if self.ne else 1

    @property
    def n_rows(self) -> int:
        return math.prod(self.ne[1:]) if self.ne else 1

    @property
    def row_bytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        return self.row_size // block * size


@dataclass(frozen=True)
class _Entry:
    start: int  # offset of the key
    end: int  # offset after the value
    vtype: GGUFValueType
    value_at: int


class _Bad(Exception):
    pass


class _Cursor:
    def __init__(self, buf: memoryview, pos: int = 0) -> None:
        self.buf, self.pos = buf, pos

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise _Bad("ends inside its header")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> bytes:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise _Bad("ends inside its header")
        self.pos += n
        return bytes(self.buf[self.pos - n : self.pos])

    def skip_value(self, vtype: int) -> None:
        if vtype == V.STRING:
            n = self.take("<Q")
            self.pos += n
        elif vtype == V.ARRAY:
            itype, count = self.take("<I"), self.take("<Q")
            if itype in _SCALARS:
                self.pos += count * struct.calcsize(_SCALARS[itype])
            else:
                for _ in range(count):
                    self.skip_value(itype)
        elif vtype in _SCALARS:
            self.pos += struct.calcsize(_SCALARS[vtype])
        else:
            raise _Bad(f"unknown metadata value type {vtype}")
        if self.pos > len(self.buf):
            raise _Bad("ends inside its header")

    def value(self, vtype: int) -> Any:
        if vtype == V.STRING:
            return self.string().decode("utf-8", errors="replace")
        if vtype == V.ARRAY:
            itype, count = self.take("<I"), self.take("<Q")
            return [self.value(itype) for _ in range(count)]
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        raise _Bad(f"unknown metadata value type {vtype}")


class GGUFFile:
    """A GGUF file opened read-only (see module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise RefusalEditError(f"GGUF file not found: {self.path}")
        size = self.path.stat().st_size
        if size < 24:
            raise RefusalEditError(f"{self.path.name} is not a valid GGUF file (only {size} bytes)")
        self.data = np.memmap(self.path, dtype=np.uint8, mode="r")
        try:
            self._parse(memoryview(self.data), size)
        except (_Bad, UnicodeDecodeError, ValueError, OverflowError) as exc:
            raise RefusalEditError(f"{self.path.name} is not a valid GGUF file ({exc})") from None
        self.arch = str(self.value("general.architecture", ""))
        if not self.arch:
            raise RefusalEditError(f"{self.path.name} has no general.architecture")

    def _parse(self, buf: memoryview, size: int) -> None:
        cur = _Cursor(buf)
        if cur.take("<I") != GGUF_MAGIC:
            raise _Bad("wrong magic number")
        version = cur.take("<I")
        if version & 0xFFFF == 0:
            raise _Bad("big-endian GGUF files are not supported")
        if version not in (2, 3):
            raise _Bad(f"unsupported GGUF version {version}")
        n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
        self.entries: dict[str, _Entry] = {}
        for _ in range(n_kv):
            start = cur.pos
            key = cur.string().decode("utf-8")
            vtype = cur.take("<I")
            value_at = cur.pos
            cur.skip_value(vtype)
            if key in self.entries:
                raise _Bad(f"duplicate metadata key {key}")
            self.entries[key] = _Entry(start, cur.pos, V(vtype), value_at)
        alignment = self.value("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise _Bad(f"invalid alignment {alignment}")
        self.alignment = alignment
        infos = []
        for _ in range(n_tensors):
            name = cur.string().decode("utf-8")
            n_dims = cur.take("<I")
            if n_dims > 8:
                raise _Bad(f"tensor {name} has {n_dims} dimensions")
            ne = tuple(cur.take("<Q") for _ in range(n_dims))
            raw_type, offset = cur.take("<I"), cur.take("<Q")
            try:
                qtype = GGMLQuantizationType(raw_type)
            except ValueError:
                raise _Bad(f"tensor {name} has unknown type {raw_type}") from None
            infos.append((name, qtype, ne, offset))
        self.data_offset = -(-cur.pos // alignment) * alignment
        self.tensors: dict[str, GGUFTensor] = {}
        for name, qtype, ne, offset in infos:
            block, type_size = GGML_QUANT_SIZES[qtype]
            if ne and ne[0] % block:
                raise _Bad(f"tensor {name} has rows of {ne[0]} values, not whole {qtype.name} blocks")
            t = GGUFTensor(name, qtype, ne, self.data_offset + offset, math.prod(ne) // block * type_size)
            if name in self.tensors:
                raise _Bad(f"duplicate tensor {name}")
            if t.offset + t.nbytes > size:
                raise RefusalEditError(
                    f"truncated GGUF file {self.path.name}: tensor {name} needs bytes up to {t.offset + t.nbytes}, "
                    f"the file has {size}"
                )
            self.tensors[name] = t

    def value(self, key: str, default: Any = None) -> Any:
        """A metadata value as Python data (strings decoded, arrays as lists)."""
        entry = self.entries.get(key)
        if entry is None:
            return default
        return _Cursor(memoryview(self.data), entry.value_at).value(entry.vtype)

    def keys(self) -> list[str]:
        return list(self.entries)

    def raw_entry(self, key: str) -> bytes:
        """The exact bytes of metadata entry `key` (key string, type, value) as stored in the file."""
        entry = self.entries[key]
        return bytes(self.data[entry.start : entry.end])

    def rows(self, t: GGUFTensor, start: int, stop: int) -> np.ndarray:
        """Stored bytes of rows [start, stop) as uint8 [stop - start, row_bytes] (a view of the mapping)."""
        begin = t.offset + start * t.row_bytes
        return self.data[begin : t.offset + stop * t.row_bytes].reshape(stop - start, t.row_bytes)

    def fd(self) -> int:
        """A fresh read-only descriptor of the file (for kernel copies); the caller closes it."""
        return os.open(self.path, os.O_RDONLY)
