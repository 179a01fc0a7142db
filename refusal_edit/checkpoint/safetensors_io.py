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
import stat
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    "F8_E8M0": 1,
}
MAX_HEADER = 100_000_000  # bytes: the safetensors library's own limit

CHUNK_BYTES = 64 << 20  # float32 bytes of one working chunk
# pwrite in slices of this size: one call per 32 MB chunk was 2x slower end to end (measured with the
# kernel copy of unchanged tensors running beside it); 0.25-2 MB slices all perform alike.
WRITE_SLICE = 1 << 20
COPY_STEP = 256 << 20  # bytes per copy_file_range call: an abandoned write stops within one step


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

    def row_span(self, start: int, stop: int) -> tuple[int, int]:
        """(offset from `begin`, byte length) of rows [start, stop) along dim 0 (the whole of a scalar)."""
        if not self.shape:
            return 0, self.nbytes
        row_bytes = math.prod(self.shape[1:]) * ITEMSIZE[self.dtype]
        return start * row_bytes, (stop - start) * row_bytes


@dataclass
class ShardHeader:
    path: Path
    data_start: int  # absolute offset of the data section
    tensors: dict[str, TensorInfo]  # in file (offset) order
    metadata: dict[str, str]
    identity: tuple[int, ...] | None = None  # (device, inode, size, mtime) when the header was read


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _pread_exact(fd: int, length: int, offset: int) -> bytes:
    parts, got = [], 0
    while got < length:
        block = os.pread(fd, length - got, offset + got)
        if not block:
            break
        parts.append(block)
        got += len(block)
    return b"".join(parts)


def open_regular(path: Path) -> tuple[int, os.stat_result]:
    """An O_RDONLY descriptor of `path` (symlinks followed) and its stat; anything but a regular file is a
    clear error. O_NONBLOCK keeps a FIFO from blocking the open until a writer appears."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise RefusalEditError(f"cannot read {path.name}: {exc.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise RefusalEditError(f"{path.name} is not a regular file")
    return fd, st


def _int(value: Any) -> bool:
    return type(value) is int and value >= 0  # JSON true/false are ints to Python: not sizes


def read_header(path: Path) -> ShardHeader:
    """Parse and validate a safetensors header as strictly as the safetensors library does: a JSON object of
    tensors with known dtypes, non-negative shapes and byte sizes that match, whose data offsets tile the
    data section exactly (no overlap, gap or trailing bytes) and string-to-string `__metadata__`. Anything
    else is a clear error here, never an output that nothing can load."""
    name = path.name

    def corrupt(why: str) -> RefusalEditError:
        return RefusalEditError(f"corrupt safetensors file {name}: {why}")

    fd, st = open_regular(path)
    try:
        size = st.st_size
        raw = _pread_exact(fd, 8, 0)
        if len(raw) < 8:
            raise corrupt("file is shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER:
            raise corrupt(f"header length {n} exceeds the {MAX_HEADER // 10**6} MB limit")
        if n > size - 8:
            raise corrupt(f"header length {n} is larger than the file")
        try:
            header = json.loads(_pread_exact(fd, n, 8), object_pairs_hook=_unique_keys)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise corrupt(f"header is not valid JSON ({str(exc)[:80]})") from None
    except OSError as exc:
        raise RefusalEditError(f"cannot read {name}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if not isinstance(header, dict):
        raise corrupt(f"header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise corrupt("__metadata__ must map strings to strings")
    infos: list[TensorInfo] = []
    for tname, h in header.items():
        if not isinstance(h, dict):
            raise corrupt(f"entry {tname!r} is not an object")
        dtype, shape, offsets = h.get("dtype"), h.get("shape"), h.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in ITEMSIZE:
            raise corrupt(f"tensor {tname} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_int(s) for s in shape):
            raise corrupt(f"tensor {tname} has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_int(o) for o in offsets)):
            raise corrupt(f"tensor {tname} has invalid data_offsets {offsets!r}")
        if offsets[0] > offsets[1]:
            raise corrupt(f"tensor {tname} ends before it begins ({offsets})")
        info = TensorInfo(tname, dtype, tuple(shape), offsets[0], offsets[1])
        if info.nbytes != info.numel * ITEMSIZE[dtype]:
            raise corrupt(f"{tname} has the wrong byte size ({info.nbytes} for shape {list(shape)} of {dtype})")
        infos.append(info)
    infos.sort(key=lambda t: (t.begin, t.end))
    data_len = size - 8 - n
    last = max((t.end for t in infos), default=0)
    if last > data_len:
        raise RefusalEditError(f"truncated safetensors file {name}: needs {last} data bytes, has {data_len}")
    pos = 0
    for t in infos:
        if t.begin != pos:
            what = "overlaps the previous tensor" if t.begin < pos else "leaves a gap before it"
            raise corrupt(f"tensor {t.name} starts at data byte {t.begin}, expected {pos} ({what})")
        pos = t.end
    if pos != data_len:
        raise corrupt(f"{data_len - pos} bytes after the last tensor (the tensors must cover the data exactly)")
    return ShardHeader(path, 8 + n, {t.name: t for t in infos}, dict(metadata), _identity(st))


class TensorReader:
    """Reads row chunks of tensors from one shard without mapping the whole file."""

    def __init__(self, header: ShardHeader) -> None:
        self.header = header
        self.fd, st = open_regular(header.path)
        if header.identity is not None and _identity(st) != header.identity:
            os.close(self.fd)
            raise RefusalEditError(f"{header.path.name} changed after its header was read; run again")

    def check_unchanged(self) -> None:
        """A clear error if the file was modified or replaced while it was being read (the output would mix
        two versions of it)."""
        try:
            now = _identity(os.fstat(self.fd))
            replaced = os.stat(self.header.path).st_ino != now[1]
        except OSError:
            replaced = True
            now = None
        if replaced or (self.header.identity is not None and now != self.header.identity):
            raise RefusalEditError(f"input {self.header.path.name} changed during the run; nothing was written")

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def rows(self, info: TensorInfo, start: int, stop: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, stop) along dim 0, in the stored dtype.

        With `buffer` (a flat uint8 tensor at least that large) the bytes land in it and the result is a
        view of it: reusing one buffer avoids faulting in fresh pages for every chunk, which costs more
        than the edit itself. Without, the result is a fresh tensor.
        """
        if info.dtype not in DTYPES:
            raise RefusalEditError(f"tensor {info.name} has unsupported dtype {info.dtype}")
        skip, length = info.row_span(start, stop)
        offset = self.header.data_start + info.begin + skip
        shape = (stop - start, *info.shape[1:]) if info.shape else ()
        if not length:
            return torch.empty(shape, dtype=DTYPES[info.dtype])
        raw = buffer[:length] if buffer is not None else torch.empty(length, dtype=torch.uint8)
        view = memoryview(raw.numpy()).cast("B")
        got = 0
        while got < length:
            n = os.preadv(self.fd, [view[got:]], offset + got)
            if n <= 0:
                raise RefusalEditError(f"unexpected end of file reading {info.name} from {self.header.path.name}")
            got += n
        return raw.view(DTYPES[info.dtype]).reshape(shape)

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


class PositionedWriter:
    """An output file whose layout (a header, then each tensor's byte range) is fixed up front; tensor bytes
    are then written at their offsets.

    Positioned writes (`pwrite`, `copy_file_range` with explicit offsets) let tensors be written in any
    order and from two threads at once: byte copies of unchanged tensors proceed in the kernel while the
    edited ones are computed. `verify` checks that every tensor received exactly its byte count. Shared by
    the safetensors shards here and the GGUF writer: only the header differs.
    """

    path: Path
    fd: int
    data_start: int
    offsets: dict[str, tuple[int, int]]  # name -> (offset from data_start, byte count)
    written: dict[str, int]

    def _open(self, path: Path, offsets: dict[str, tuple[int, int]], data_start: int, size: int | None = None) -> None:
        """Create `path` (`size` bytes of zeros if given: padding between tensors reads back as zeros)."""
        self.path, self.offsets, self.data_start = path, offsets, data_start
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        if size is not None:
            os.ftruncate(self.fd, size)
        self.written = dict.fromkeys(offsets, 0)

    def pwrite(self, data: bytes | memoryview, pos: int) -> None:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done : done + WRITE_SLICE], pos + done)

    def position(self, name: str, length: int) -> int:
        """Where the next `length` bytes of tensor `name` go (and count them as written)."""
        begin, size = self.offsets[name]
        done = self.written[name]
        if done + length > size:
            raise RuntimeError(f"{name}: more bytes than the header says")
        self.written[name] = done + length
        return self.data_start + begin + done

    def copy(self, name: str, src_fd: int, offset: int, length: int, stop: threading.Event | None = None) -> None:
        """Copy a whole unchanged tensor from another file, in the kernel where the filesystem can. A set
        `stop` ends the copy early (the output is being abandoned)."""
        pos = self.position(name, length)
        done = 0
        while done < length:
            if stop is not None and stop.is_set():
                return
            try:
                n = os.copy_file_range(src_fd, self.fd, min(length - done, COPY_STEP), offset + done, pos + done)
            except OSError:
                n = 0
            if n <= 0:  # filesystems without copy_file_range: plain reads
                block = os.pread(src_fd, min(CHUNK_BYTES, length - done), offset + done)
                if not block:
                    raise RefusalEditError("unexpected end of file while copying a tensor")
                self.pwrite(block, pos + done)
                n = len(block)
            done += n

    def close(self) -> None:
        os.close(self.fd)

    def verify(self) -> None:
        """Every tensor received exactly the bytes its header announces (a bug otherwise)."""
        missing = [n for n, (_, size) in self.offsets.items() if self.written[n] != size]
        if missing:
            raise RuntimeError(f"{self.path.name}: {len(missing)} tensors incomplete, e.g. {missing[0]}")


class ShardWriter(PositionedWriter):
    """A safetensors file: the JSON header is written first, then each tensor's bytes at their offsets."""

    def __init__(self, path: Path, tensors: list[OutTensor], metadata: dict[str, str] | None = None) -> None:
        header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        offsets: dict[str, tuple[int, int]] = {}
        for t in tensors:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offsets[t.name] = (offset, t.nbytes)
            offset += t.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._open(path, offsets, 8 + len(blob))
        self.pwrite(struct.pack("<Q", len(blob)) + blob, 0)

    def write_chunk(self, name: str, chunk: torch.Tensor) -> None:
        """Append the next chunk (in the output dtype) of tensor `name`."""
        data = chunk.contiguous()
        if data.dtype == torch.bfloat16:
            data = data.view(torch.int16)
        view = memoryview(data.numpy()).cast("B")
        self.pwrite(view, self.position(name, len(view)))

    copy_bytes = PositionedWriter.copy
