"""Execute an `EditPlan`: stream every shard of the input into a new checkpoint directory.

Output shards mirror the input (same files, same tensor order; new tensors join the shard of the tensor
they derive from) unless `max_shard_bytes` asks for resharding. Unchanged tensors are copied byte for
byte; edited ones go through float32 chunks and are cast back to the stored dtype (or `dtype`). The
whole directory is built beside `out` and renamed at the end; the input is only ever read.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
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
    ShardHeader,
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


def _out_code(code: str, dtype: str) -> str:
    if dtype == "keep" or code not in ("F32", "F16", "BF16", "F64"):
        return code
    return CODE_OF[getattr(torch, dtype)]


def _layout(ckpt: Checkpoint, plan: EditPlan, dtype: str, max_shard_bytes: int | None) -> dict[str, list[_Item]]:
    new_by_shard: dict[str, list[NewTensor]] = {}
    for t in plan.new:
        new_by_shard.setdefault(t.shard, []).append(t)
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


def _write_item(
    writer: ShardWriter, item: _Item, readers: dict[Path, TensorReader], headers: dict[Path, ShardHeader]
) -> bool:
    """Write one tensor; returns True when it was edited or converted (not a byte copy)."""
    writer.begin(item.name)
    target = DTYPES[item.out.dtype]
    if item.source is None:
        zeros = torch.zeros(item.out.shape, dtype=torch.float32)
        if item.transform is not None:
            zeros = item.transform.apply(0, item.out.shape[0], zeros)
        writer.write_chunk(zeros.to(target))
        writer.end(item.name)
        return True
    path, info = item.source
    if path not in readers:
        readers[path] = TensorReader(headers[path])
    reader = readers[path]
    if item.transform is None and item.out.dtype == info.dtype:
        writer.copy_bytes(reader.fd, reader.header.data_start + info.begin, info.nbytes)
        writer.end(item.name)
        return False
    ranges = chunk_rows(info)
    t = item.transform
    if t is not None and t.needs_pass:
        for start, stop in ranges:
            t.observe(start, stop, reader.rows(info, start, stop).float())
    for start, stop in ranges:
        chunk = reader.rows(info, start, stop)
        if t is not None:
            chunk = t.apply(start, stop, chunk.float())
        writer.write_chunk(chunk.to(target))
    writer.end(item.name)
    return True


def write_checkpoint(
    ckpt: Checkpoint,
    plan: EditPlan,
    out: Path,
    force: bool = False,
    dtype: str = "keep",
    max_shard_bytes: int | None = None,
    extra_files: Callable[[Path], None] | None = None,
) -> WriteResult:
    """Write the edited checkpoint to `out` atomically; `extra_files(tmp)` adds cards and records."""
    if dtype not in OUT_DTYPES:
        raise RefusalEditError(f"unknown output dtype {dtype!r} ({', '.join(OUT_DTYPES)})")
    if Path(out).resolve() == ckpt.root.resolve():
        raise RefusalEditError("--out must differ from the input model directory (the input is never modified)")
    start = time.perf_counter()
    groups = _layout(ckpt, plan, dtype, max_shard_bytes)
    headers = {shard.path: shard for shard in ckpt.shards}
    existing = set(ckpt.names())
    copy_files, _skipped = ckpt.other_files()
    total = sum(i.out.nbytes for items in groups.values() for i in items)
    stats = {"edited": 0, "copied": 0, "created": 0}
    with atomic_dir(Path(out), force=force) as tmp:
        readers: dict[Path, TensorReader] = {}
        try:
            with progress() as bar:
                task = bar.add_task("writing shards", total=total)
                for shard_name, items in groups.items():
                    writer = ShardWriter(tmp / shard_name, [i.out for i in items], {"format": "pt"})
                    for item in items:
                        changed = _write_item(writer, item, readers, headers)
                        if item.name not in existing:
                            stats["created"] += 1
                        elif changed:
                            stats["edited"] += 1
                        else:
                            stats["copied"] += 1
                        bar.advance(task, item.out.nbytes)
                    writer.close()
        finally:
            for r in readers.values():
                r.close()
        if len(groups) > 1 or ckpt.index is not None:
            weight_map = {i.name: shard for shard, items in groups.items() for i in items}
            metadata = dict((ckpt.index or {}).get("metadata", {}))
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
    return WriteResult(Path(out), time.perf_counter() - start, total, shards=list(groups), **stats)
