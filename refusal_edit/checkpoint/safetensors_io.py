"""Low-memory safetensors I/O: parse and validate headers, read row chunks, stream tensors out.

The weight edit never holds more than a bounded chunk of a tensor in memory: rows are read with
`pread` into a reusable buffer, edited in float32 and written straight to the output file, whose
header is known in advance (edits keep shapes). Unchanged tensors are copied byte for byte with
`copy_file_range` (no round trip through user space).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from refusal_edit.errors import RefusalEditError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
FLOAT_CODES = ("F64", "F32", "F16", "BF16")
CODE_OF = {v: k for k, v in DTYPES.items()}
ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}

CHUNK_BYTES = 64 << 20  # float32 bytes of one working chunk


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # offsets relative to the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_CODES


@dataclass
class ShardHeader:
    path: Path
    data_start: int  # absolute offset of the data section
    tensors: dict[str, TensorInfo]  # in file (offset) order
    metadata: dict[str, str]


def read_header(path: Path) -> ShardHeader:
    """Parse and validate a safetensors header; corrupt or truncated files are a clear error."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise ValueError("file is shorter than a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 << 20):
                raise ValueError("header length is larger than the file")
            header = json.loads(fh.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise RefusalEditError(f"corrupt safetensors file {path.name}: {exc}") from exc
    metadata = header.pop("__metadata__", {}) or {}
    infos: list[TensorInfo] = []
    for name, h in header.items():
        try:
            begin, end = (int(x) for x in h["data_offsets"])
            info = TensorInfo(name, str(h["dtype"]), tuple(int(s) for s in h["shape"]), begin, end)
        except (KeyError, TypeError, ValueError) as exc:
            raise RefusalEditError(f"corrupt safetensors file {path.name}: bad entry for {name}") from exc
        if info.dtype in ITEMSIZE and info.nbytes != info.numel * ITEMSIZE[info.dtype]:
            raise RefusalEditError(f"corrupt safetensors file {path.name}: {name} has the wrong byte size")
        infos.append(info)
    infos.sort(key=lambda t: t.begin)
    data_len = size - 8 - n
    if infos and infos[-1].end > data_len:
        raise RefusalEditError(
            f"truncated safetensors file {path.name}: needs {infos[-1].end} data bytes, has {data_len}"
        )
    return ShardHeader(path, 8 + n, {t.name: t for t in infos}, dict(metadata))


class TensorReader:
    """Reads row chunks of tensors from one shard without mapping the whole file."""

    def __init__(self, header: ShardHeader) -> None:
        self.header = header
        self.fd = os.open(header.path, os.O_RDONLY)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def rows(self, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) along dim 0, in the stored dtype (a fresh tensor)."""
        if info.dtype not in DTYPES:
            raise RefusalEditError(f"tensor {info.name} has unsupported dtype {info.dtype}")
        row_shape = info.shape[1:]
        row_bytes = math.prod(row_shape) * ITEMSIZE[info.dtype] if info.shape else info.nbytes
        offset = self.header.data_start + info.begin + start * row_bytes
        length = (stop - start) * row_bytes if info.shape else info.nbytes
        buf = bytearray(length)
        view = memoryview(buf)
        got = 0
        while got < length:
            n = os.preadv(self.fd, [view[got:]], offset + got)
            if n <= 0:
                raise RefusalEditError(f"unexpected end of file reading {info.name} from {self.header.path.name}")
            got += n
        flat = torch.frombuffer(buf, dtype=DTYPES[info.dtype]) if length else torch.empty(0, dtype=DTYPES[info.dtype])
        return flat.reshape((stop - start, *row_shape) if info.shape else ())

    def tensor(self, info: TensorInfo) -> torch.Tensor:
        return self.rows(info, 0, info.shape[0] if info.shape else 0)


def chunk_rows(info: TensorInfo, budget: int = CHUNK_BYTES) -> list[tuple[int, int]]:
    """Row ranges whose float32 copies stay within `budget` bytes."""
    if not info.shape:
        return [(0, 0)]
    per_row = max(1, math.prod(info.shape[1:]) * 4)
    step = max(1, budget // per_row)
    return [(s, min(s + step, info.shape[0])) for s in range(0, info.shape[0], step)]


@dataclass
class OutTensor:
    """A tensor of the output file: where its bytes come from is decided by the caller."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


class ShardWriter:
    """Writes a safetensors file whose header is fixed up front; tensors are then streamed in order."""

    def __init__(self, path: Path, tensors: list[OutTensor], metadata: dict[str, str] | None = None) -> None:
        header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        self.order = [t.name for t in tensors]
        self.sizes = {}
        for t in tensors:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            self.sizes[t.name] = t.nbytes
            offset += t.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.path = path
        self.fh: BinaryIO = path.open("wb")
        self.fh.write(struct.pack("<Q", len(blob)))
        self.fh.write(blob)
        self.next = 0
        self.written = 0

    def _expect(self, name: str) -> None:
        if self.next >= len(self.order) or self.order[self.next] != name:
            raise RuntimeError(f"tensor {name} written out of order")

    def begin(self, name: str) -> None:
        self._expect(name)
        self.written = 0

    def write_chunk(self, chunk: torch.Tensor) -> None:
        data = chunk.contiguous()
        if data.dtype == torch.bfloat16:
            data = data.view(torch.int16)
        mv = memoryview(data.numpy()).cast("B")
        self.fh.write(mv)
        self.written += len(mv)

    def copy_bytes(self, src_fd: int, offset: int, length: int) -> None:
        self.fh.flush()
        out_fd = self.fh.fileno()
        pos = self.fh.tell()
        done = 0
        while done < length:
            try:
                n = os.copy_file_range(src_fd, out_fd, length - done, offset + done, pos + done)
            except OSError:
                n = 0
            if n <= 0:  # filesystems without copy_file_range: plain reads
                os.lseek(out_fd, pos + done, os.SEEK_SET)
                while done < length:
                    block = os.pread(src_fd, min(CHUNK_BYTES, length - done), offset + done)
                    if not block:
                        raise RefusalEditError("unexpected end of file while copying a tensor")
                    os.write(out_fd, block)
                    done += len(block)
                break
            done += n
        self.fh.seek(pos + length)
        self.written += length

    def end(self, name: str) -> None:
        if self.written != self.sizes[name]:
            raise RuntimeError(f"{name}: wrote {self.written} bytes, expected {self.sizes[name]}")
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.order):
            self.fh.close()
            raise RuntimeError(f"{self.path.name}: {len(self.order) - self.next} tensors were not written")
        self.fh.close()
