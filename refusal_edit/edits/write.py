"""Execute an `EditPlan`: stream every shard of the input into a new checkpoint directory.

Output shards mirror the input (same files, same tensor order; new tensors join the shard of the tensor
they derive from) unless `max_shard_bytes` asks for resharding. Unchanged tensors are copied byte for
byte; edited ones go through float32 chunks and are cast back to the stored dtype (or `dtype`). The
whole directory is built beside `out` and renamed at the end; the input is only ever read, and `out` may
never be, contain or lie inside an input (see `checkpoint.atomic`). An output value that is NaN or infinite
where the input's is finite (float16 overflow, a NaN input weight spread by the edit) is an error.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from refusal_edit.checkpoint.atomic import atomic_dir
from refusal_edit.checkpoint.layout import INDEX, Checkpoint
from refusal_edit.checkpoint.safetensors_io import (
    CODE_OF,
    DTYPES,
    OutTensor,
    ShardWriter,
    TensorInfo,
    TensorReader,
    chunk_rows,
)
from refusal_edit.console import progress
from refusal_edit.edits.plan import EditPlan, NewTensor
from refusal_edit.errors import RefusalEditError

OUT_DTYPES = ("keep", "bfloat16", "float16", "float32")


@dataclass
class _Item:
    """One output tensor and where its bytes come from."""

    name: str
    out: OutTensor
    source: tuple[Path, TensorInfo] | None  # None: zeros
    transform: Any = None


@dataclass
class WriteResult:
    out: Path
    seconds: float
    bytes_written: int
    edited: int
    copied: int
    created: int
    shards: list[str] = field(default_factory=list)
    nonfinite: dict[str, int] = field(default_factory=dict)  # tensor -> values written as NaN/inf (allowed)
    skipped: list[str] = field(default_factory=list)  # top-level files of the input deliberately not copied
    warnings: list[str] = field(default_factory=list)  # for the user, parameter names in backticks


def _out_code(code: str, dtype: str) -> str:
    if dtype == "keep" or code not in ("F32", "F16", "BF16", "F64"):
        return code
    return CODE_OF[getattr(torch, dtype)]


def _layout(ckpt: Checkpoint, plan: EditPlan, dtype: str, max_shard_bytes: int | None) -> dict[str, list[_Item]]:
    new_by_shard: dict[str, list[NewTensor]] = {}
    for t in plan.new:  # a new tensor joins the shard of the tensor it sits beside
        anchor = ckpt.find(t.anchor)
        if anchor is None:
            raise RuntimeError(f"new tensor {t.name} is anchored to a missing tensor {t.anchor}")
        new_by_shard.setdefault(anchor[0].path.name, []).append(t)
    items: list[tuple[str, _Item]] = []
    for shard in ckpt.shards:
        for name, info in shard.tensors.items():
            out = OutTensor(name, _out_code(info.dtype, dtype), info.shape)
            items.append((shard.path.name, _Item(name, out, (shard.path, info), plan.transforms.get(name))))
        for t in new_by_shard.pop(shard.path.name, []):
            src = ckpt.find(t.source) if t.source else None
            source = (src[0].path, src[1]) if src else None
            out = OutTensor(t.name, _out_code(t.dtype, dtype), t.shape)
            items.append((shard.path.name, _Item(t.name, out, source, t.transform)))
    if new_by_shard:
        raise RuntimeError(f"new tensors assigned to unknown shards: {sorted(new_by_shard)}")
    if max_shard_bytes is None:
        grouped: dict[str, list[_Item]] = {}
        for shard_name, item in items:
            grouped.setdefault(shard_name, []).append(item)
        return grouped
    chunks: list[list[_Item]] = [[]]
    size = 0
    for _, item in items:
        if chunks[-1] and size + item.out.nbytes > max_shard_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(item)
        size += item.out.nbytes
    if len(chunks) == 1:
        return {"model.safetensors": chunks[0]}
    n = len(chunks)
    return {f"model-{i + 1:05d}-of-{n:05d}.safetensors": c for i, c in enumerate(chunks)}


FLOAT_CACHE_BYTES = 256 << 20  # two-pass edits keep their float32 chunks between passes up to this size


class Workspace:
    """Flat byte buffers reused for every chunk of every tensor, grown to the largest request.

    Fresh chunk-sized allocations are returned to the OS when freed and fault in new zeroed pages on
    the next use; on a bf16 checkpoint that page-fault traffic took longer than reading, converting,
    editing and writing combined. Three roles: raw stored bytes, float32 work, output-dtype bytes.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, role: str, nbytes: int) -> torch.Tensor:
        buf = self._buffers.get(role)
        if buf is None or buf.numel() < nbytes:
            self._buffers.pop(role, None)
            buf = self._buffers[role] = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        return buf[:nbytes]

    def typed(self, role: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        n = math.prod(shape)
        return self.get(role, n * dtype.itemsize).view(dtype).reshape(shape)


def _is_copy(item: _Item) -> bool:
    return item.source is not None and item.transform is None and item.out.dtype == item.source[1].dtype


def _copy_items(
    writer: ShardWriter, items: list[_Item], readers: dict[Path, TensorReader], advance, stop: threading.Event
) -> None:
    for item in items:
        if stop.is_set():
            return
        path, info = item.source  # type: ignore[misc]
        reader = readers[path]
        writer.copy_bytes(item.name, reader.fd, reader.header.data_start + info.begin, info.nbytes, stop)
        advance(item.out.nbytes)


class FiniteGuard:
    """Finds output values that are NaN or infinite where the input's are finite: a cast beyond float16's
    range, or one NaN input weight spread through a whole column by the rank-1 update.

    The common case costs one min/max reduction per chunk of the value written (NaN and inf both show in
    it); only a chunk that fails it is compared element by element with the input, re-read from disk.
    The first such tensor is an error, unless `allow`: then they are all collected in `found`.
    """

    def __init__(self, allow: bool = False) -> None:
        self.allow = allow
        self.found: dict[str, int] = {}

    def check(
        self, name: str, written: torch.Tensor, values: torch.Tensor, before: Callable[[], torch.Tensor | None]
    ) -> None:
        """`written`: the chunk as written; `values`: the same before the cast; `before()`: the input chunk
        (stored dtype; None for a tensor created from zeros)."""
        if not written.numel() or not written.is_floating_point():
            return
        lo, hi = torch.aminmax(written.reshape(-1))
        if math.isfinite(lo.item()) and math.isfinite(hi.item()):
            return
        bad = ~torch.isfinite(written)
        original = before()
        if original is not None and original.is_floating_point():
            bad &= torch.isfinite(original).reshape(bad.shape)
        n = int(bad.sum())
        if not n:
            return  # non-finite in the input already, at the same places: not ours to judge
        self.found[name] = self.found.get(name, 0) + n
        if not self.allow:
            overflow = values is not written and int((bad & torch.isfinite(values)).sum()) == n
            dtype = str(written.dtype).removeprefix("torch.")
            why = (
                f"{n} values exceed the range of {dtype}"
                if overflow
                else f"{n} values became NaN or inf although the input is finite there (a NaN or inf in the input "
                "or the direction spreads through the edit)"
            )
            raise RefusalEditError(
                f"non-finite output in {name}: {why}; nothing was written (`allow_nonfinite` writes it anyway)"
            )

    def warning(self) -> str | None:
        if not self.found:
            return None
        names = ", ".join(f"{k} ({v} values)" for k, v in self.found.items())
        return f"NaN or inf written where the input is finite (`allow_nonfinite`): {names}"


def _stored(reader: TensorReader, info: TensorInfo, rows: tuple[int, int], ws: Workspace) -> torch.Tensor:
    """Rows [start, stop) in the stored dtype, read into the workspace's raw buffer."""
    return reader.rows(info, *rows, ws.get("raw", info.row_span(*rows)[1]))


def _read_float(
    reader: TensorReader, info: TensorInfo, rows: tuple[int, int], dest: torch.Tensor, ws: Workspace
) -> torch.Tensor:
    """Rows [start, stop) converted to float32 into `dest` (read in place when already float32)."""
    if info.dtype == "F32":
        return reader.rows(info, *rows, dest.view(-1).view(torch.uint8))
    return dest.copy_(_stored(reader, info, rows, ws))


def _write_cast(
    writer: ShardWriter,
    name: str,
    chunk: torch.Tensor,
    target: torch.dtype,
    ws: Workspace,
    guard: FiniteGuard,
    before: Callable[[], torch.Tensor | None],
) -> None:
    out = chunk if chunk.dtype == target else ws.typed("out", target, tuple(chunk.shape)).copy_(chunk)
    guard.check(name, out, chunk, before)
    writer.write_chunk(name, out)


def _edit_item(
    writer: ShardWriter, item: _Item, readers: dict[Path, TensorReader], ws: Workspace, guard: FiniteGuard
) -> None:
    """Compute one tensor chunk by chunk in float32 and write it in the output dtype."""
    target = DTYPES[item.out.dtype]
    t = item.transform
    if item.source is None:
        zeros = torch.zeros(item.out.shape, dtype=torch.float32)
        if t is not None:
            zeros = t.apply(0, item.out.shape[0], zeros)
        _write_cast(writer, item.name, zeros, target, ws, guard, lambda: None)
        return
    path, info = item.source
    reader = readers[path]
    ranges = chunk_rows(info)

    def original(rows: tuple[int, int]) -> Callable[[], torch.Tensor]:
        """The input rows as stored, re-read (only when a chunk fails the finiteness check)."""
        return lambda: reader.rows(info, *rows, ws.get("check", info.row_span(*rows)[1]))

    def work(rows: tuple[int, int]) -> torch.Tensor:
        """The float32 work buffer for rows [start, stop)."""
        return ws.typed("float", torch.float32, (rows[1] - rows[0], *info.shape[1:]) if info.shape else ())

    if t is None:  # a dtype change only: convert straight from the stored bytes
        for rows in ranges:
            _write_cast(writer, item.name, _stored(reader, info, rows, ws), target, ws, guard, original(rows))
        return
    if t.needs_pass and info.numel * 4 <= FLOAT_CACHE_BYTES:
        # Both passes over one float32 copy of the whole tensor: each byte is read and converted once.
        whole = ws.typed("float", torch.float32, info.shape)
        for start, stop in ranges:
            t.observe(start, stop, _read_float(reader, info, (start, stop), whole[start:stop], ws))
        for start, stop in ranges:
            edited = t.apply(start, stop, whole[start:stop])
            _write_cast(writer, item.name, edited, target, ws, guard, original((start, stop)))
        return
    if t.needs_pass:
        for rows in ranges:
            t.observe(*rows, _read_float(reader, info, rows, work(rows), ws))
    for rows in ranges:
        edited = t.apply(*rows, _read_float(reader, info, rows, work(rows), ws))
        _write_cast(writer, item.name, edited, target, ws, guard, original(rows))


def _skipped_note(names: list[str]) -> str | None:
    if not names:
        return None
    return f"not copied (symbolic links out of the model folder, or not regular files): {', '.join(names)}"


def write_checkpoint(
    ckpt: Checkpoint,
    plan: EditPlan,
    out: Path,
    force: bool = False,
    dtype: str = "keep",
    max_shard_bytes: int | None = None,
    extra_files: Callable[[Path], None] | None = None,
    inputs: Iterable[Path] = (),
    replace_any: bool = False,
    allow_nonfinite: bool = False,
) -> WriteResult:
    """Write the edited checkpoint to `out` atomically; `extra_files(tmp)` adds cards and records.

    `out` is checked against the checkpoint's own files and `inputs` (e.g. the direction file): it may not
    be, contain or lie inside any of them. `force` replaces an existing `out` only if it is empty or a
    previous output of this tool, unless `replace_any`. An output value that is NaN or inf where the
    input's is finite is an error, or with `allow_nonfinite` a warning naming the tensors.
    """
    if dtype not in OUT_DTYPES:
        raise RefusalEditError(f"unknown output dtype {dtype!r} ({', '.join(OUT_DTYPES)})")
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise RefusalEditError(f"`max_shard_bytes` must be positive, got {max_shard_bytes}")
    guard = FiniteGuard(allow_nonfinite)
    start = time.perf_counter()
    groups = _layout(ckpt, plan, dtype, max_shard_bytes)
    headers = {shard.path: shard for shard in ckpt.shards}
    existing = set(ckpt.names())
    copy_files, skipped = ckpt.other_files()
    total = sum(i.out.nbytes for items in groups.values() for i in items)
    stats = {"edited": 0, "copied": 0, "created": 0}
    protected = [*ckpt.input_paths(), *(p.resolve() for p in copy_files), *inputs]
    with atomic_dir(Path(out), force=force, inputs=protected, replace_any=replace_any) as tmp:
        readers: dict[Path, TensorReader] = {}
        for path, header in headers.items():
            readers[path] = TensorReader(header)
        ws = Workspace()
        writers: list[ShardWriter] = []
        stop = threading.Event()
        try:
            with progress() as bar, ThreadPoolExecutor(max_workers=1) as pool:
                task = bar.add_task("writing shards", total=total)

                def advance(n: int) -> None:
                    bar.advance(task, n)

                jobs = []
                for shard_name, items in groups.items():
                    writers.append(ShardWriter(tmp / shard_name, [i.out for i in items], {"format": "pt"}))
                    jobs.append((writers[-1], items))
                # Unchanged tensors of every shard are copied by the kernel in the background while the
                # edited ones are computed here: the two overlap across shard boundaries too.
                copies = pool.submit(
                    lambda: [
                        _copy_items(w, [i for i in items if _is_copy(i)], readers, advance, stop) for w, items in jobs
                    ]
                )
                try:
                    for writer, items in jobs:
                        for item in items:
                            if _is_copy(item):
                                stats["copied"] += 1
                                continue
                            _edit_item(writer, item, readers, ws, guard)
                            advance(item.out.nbytes)
                            stats["created" if item.name not in existing else "edited"] += 1
                except BaseException:
                    stop.set()  # the output is abandoned: the background copy need not finish
                    raise
                finally:
                    copies.result()
            for w in writers:
                w.verify()
            for r in readers.values():
                r.check_unchanged()
        finally:
            for w in writers:
                w.close()
            for r in readers.values():
                r.close()
        if len(groups) > 1 or ckpt.index is not None:
            weight_map = {i.name: shard for shard, items in groups.items() for i in items}
            metadata = dict((ckpt.index or {}).get("metadata") or {})
            metadata["total_size"] = total
            (tmp / INDEX).write_text(json.dumps({"metadata": metadata, "weight_map": weight_map}, indent=2) + "\n")
        for p in copy_files:
            if p.name == "config.json" and (plan.config is not None or dtype != "keep"):
                continue
            shutil.copy2(p, tmp / p.name)
        if plan.config is not None or dtype != "keep":
            config = dict(plan.config or ckpt.config)
            if dtype != "keep":
                config["dtype"] = dtype
                config.pop("torch_dtype", None)
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if extra_files is not None:
            extra_files(tmp)
    warning = guard.warning()
    unsafe = [p.name for p in ckpt.unsafe_files()]
    return WriteResult(
        Path(out),
        time.perf_counter() - start,
        total,
        shards=list(groups),
        nonfinite=dict(guard.found),
        skipped=[p.name for p in skipped],
        warnings=[w for w in (warning, _skipped_note(unsafe)) if w],
        **stats,
    )
