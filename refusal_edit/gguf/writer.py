"""Stream a GGUF file out: header fixed up front, tensor data written at its offsets, built beside the target.

gguf-py's `GGUFWriter` re-encodes every metadata value from Python objects and writes tensor data from numpy
arrays it holds until the end (or spools them to a temporary file); it cannot copy an input's bytes. An edit
needs three things it lacks: metadata entries copied verbatim (a 150k-token vocabulary is not re-encoded,
types are kept exactly), unchanged tensors copied by the kernel (`copy_file_range`), and edited tensors
written chunk by chunk as they are requantized. The format itself is small: magic, version, counts,
metadata entries, tensor infos (name, dims, type, offset), padding to the alignment, aligned tensor data.

One metadata value may be reserved at a fixed size and rewritten once the data is written (`reserve`):
the edit record carries figures (requantization error) known only at the end.
"""

from __future__ import annotations

import os
import struct
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUF_MAGIC, GGMLQuantizationType, GGUFValueType

from refusal_edit.checkpoint.atomic import TMP_MARK, resolve_output
from refusal_edit.checkpoint.safetensors_io import PositionedWriter
from refusal_edit.errors import RefusalEditError
from refusal_edit.gguf.file import GGUFFile
from refusal_edit.interrupt import output_complete

GGUF_VERSION = 3


def _string(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


_INT_FORMATS = {GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.UINT64: "<Q"}


def pack_entry(key: str, value: str | int | float | bool | list[str] | tuple[int, GGUFValueType]) -> bytes:
    """One metadata entry (key, type, value) for the values this tool writes: scalars, strings, a list of
    strings, or `(int, GGUFValueType)` for an integer of a stated type (ggml's `general.base_model.count` is
    UINT32)."""
    if isinstance(value, tuple):
        number, vtype = value
        return _string(key) + struct.pack("<I", vtype) + struct.pack(_INT_FORMATS[vtype], number)
    if isinstance(value, list):
        items = b"".join(_string(v) for v in value)
        return _string(key) + struct.pack("<IIQ", GGUFValueType.ARRAY, GGUFValueType.STRING, len(value)) + items
    if isinstance(value, bool):
        return _string(key) + struct.pack("<I?", GGUFValueType.BOOL, value)
    if isinstance(value, int):
        return _string(key) + struct.pack("<Iq", GGUFValueType.INT64, value)
    if isinstance(value, float):
        return _string(key) + struct.pack("<If", GGUFValueType.FLOAT32, value)
    return _string(key) + struct.pack("<I", GGUFValueType.STRING) + _string(value)


def _pad(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


@dataclass(frozen=True)
class OutTensor:
    name: str
    qtype: GGMLQuantizationType
    ne: tuple[int, ...]  # ne0 first
    nbytes: int


class StreamWriter(PositionedWriter):
    """A GGUF file whose header is written first; tensor bytes then go to their offsets in any order
    (`PositionedWriter`: positioned writes, kernel copies of unchanged tensors, `verify`).

    `reserve` names string entries (key -> byte size) whose value is rewritten by `rewrite` at the end,
    padded with spaces (JSON text stays valid).
    """

    def __init__(
        self,
        path: Path,
        entries: list[bytes],
        tensors: list[OutTensor],
        alignment: int,
        reserve: dict[str, int] | None = None,
    ) -> None:
        self.path = path
        self.reserved: dict[str, tuple[int, int]] = {}  # key -> (absolute offset of the value, size)
        head = bytearray(
            struct.pack("<IIQQ", GGUF_MAGIC, GGUF_VERSION, len(tensors), len(entries) + len(reserve or {}))
        )
        for entry in entries:
            head += entry
        for key, size in (reserve or {}).items():
            head += _string(key) + struct.pack("<I", GGUFValueType.STRING) + struct.pack("<Q", size)
            self.reserved[key] = (len(head), size)
            head += b" " * size
        self.offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for t in tensors:
            head += (
                _string(t.name) + struct.pack(f"<I{len(t.ne)}QI", len(t.ne), *t.ne, t.qtype) + struct.pack("<Q", offset)
            )
            self.offsets[t.name] = (offset, t.nbytes)
            offset = _pad(offset + t.nbytes, alignment)
        self.data_start = _pad(len(head), alignment)
        self.size = self.data_start + offset
        self._open(path, self.offsets, self.data_start, self.size)  # padding reads back as zeros
        self.pwrite(bytes(head), 0)

    def write(self, name: str, data: np.ndarray) -> None:
        """Append the next bytes of tensor `name`."""
        raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        self.pwrite(memoryview(raw), self.position(name, raw.size))

    def rewrite(self, key: str, text: str) -> None:
        pos, size = self.reserved[key]
        data = text.encode()
        if len(data) > size:
            raise RuntimeError(f"metadata {key}: {len(data)} bytes do not fit the {size} reserved")
        self.pwrite(data + b" " * (size - len(data)), pos)


def _is_tool_gguf(path: Path) -> bool:

    try:
        return any(k.startswith("refusal_edit.") for k in GGUFFile(path).keys())
    except RefusalEditError:
        return False


@contextmanager
def atomic_file(
    out: Path, force: bool = False, inputs: tuple[Path, ...] = (), replace_any: bool = False
) -> Iterator[Path]:
    """Yield a temporary path beside `out` that becomes `out` when the block succeeds (removed otherwise).

    An existing `out` is replaced only with `force`, and only if it is a file this tool wrote (a GGUF with
    `refusal_edit.*` metadata) unless `replace_any`; the output may never be one of `inputs`.
    """
    shown = Path(out)
    target = resolve_output(shown, inputs)
    if os.path.lexists(target):
        if target.is_dir():
            raise RefusalEditError(f"output {shown} is a directory; give a .gguf file path")
        if not force:
            raise RefusalEditError(f"output exists: {shown} (`force` replaces it)")
        if not replace_any and not _is_tool_gguf(target):
            raise RefusalEditError(
                f"refusing to replace {shown}: it is not a GGUF written by refusal-edit (`replace_any` replaces it)"
            )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RefusalEditError(f"cannot create {target.parent}: {exc.strerror}") from None
    tmp = target.parent / f"{target.name}{TMP_MARK}{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        os.replace(tmp, target)
    except OSError as exc:
        raise RefusalEditError(f"failed to write {shown}: {exc.strerror or exc}; nothing was written") from None
    finally:
        with suppress(OSError):
            tmp.unlink()
    output_complete(shown)
