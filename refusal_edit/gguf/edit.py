"""Execute an `EditPlan` on a GGUF file: a new GGUF with the edited tensors requantized to their own types.

The plan is the HF path's (`refusal_edit.edits.plan`, reading a `GGUFSource`); so are its `ChunkTransform`s.
Each edited tensor is dequantized (gguf-py) chunk by chunk along HF dim 0 (whole stored rows), edited in
float32, requantized to the type it had (gguf-py's quantizers, ours for K-quants) and written at its offset;
unchanged tensors are copied byte for byte by the kernel meanwhile. Every metadata entry is copied verbatim but
`general.name` / `finetune` / `tags` / `base_model.*`, rewritten to name the file an edit of its input
(`gguf.metadata`); `refusal_edit.record` (the edit record as JSON) and `refusal_edit.requantization` (measured
error per type) are added. The file keeps its size up to those keys. A type we cannot write falls back to the smallest
writable type with as many bits per weight, with a notice per tensor in the result and the record.

For each projected tensor the result reports the norm of its component along the removed basis before the
edit and after requantization: what requantization noise leaves of the direction.
"""

from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from refusal_edit.checkpoint.record import EditRecord
from refusal_edit.console import progress
from refusal_edit.edits.ops import ChunkTransform, ProjectExperts, ProjectFirstDim, ProjectLastDim
from refusal_edit.edits.plan import EditPlan
from refusal_edit.edits.write import WriteResult
from refusal_edit.errors import RefusalEditError
from refusal_edit.gguf import metadata, quants
from refusal_edit.gguf.file import GGUFTensor
from refusal_edit.gguf.hf_view import GGUFSource
from refusal_edit.gguf.rounding import CODECS, DirectionRounding
from refusal_edit.gguf.writer import OutTensor, StreamWriter, atomic_file, pack_entry

PREFIX = "refusal_edit."
RECORD_KEY = PREFIX + "record"
REQUANT_KEY = PREFIX + "requantization"
CHUNK_BYTES = 64 << 20  # float32 bytes per working chunk
FLOAT_CACHE_BYTES = 256 << 20  # two-pass edits keep the whole float32 tensor up to this size


@dataclass
class TensorStats:
    """One edited tensor: its stored type, the requantization error and the removed component."""

    name: str
    qtype: str  # type in the input
    stored_as: str  # type written (differs only on a fallback)
    rel_error: float  # rms(requantized - edited) / rms(edited)
    r_before: float | None = None  # norm of the component along the basis, original tensor
    r_after: float | None = None  # the same, written (requantized) tensor

    @property
    def r_left(self) -> float | None:
        """Fraction of the original component left after the edit and requantization."""
        if self.r_before is None or self.r_after is None or self.r_before == 0:
            return None
        return self.r_after / self.r_before


@dataclass
class GGUFWriteResult(WriteResult):
    """The safetensors writer's counts, plus each edited tensor's requantization figures."""

    tensors: list[TensorStats] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    record: dict[str, Any] | None = None

    def by_type(self) -> dict[str, dict[str, Any]]:
        """Per stored type: tensors, mean and max requantization error, max fraction of r left."""
        out: dict[str, dict[str, Any]] = {}
        for s in self.tensors:
            d = out.setdefault(
                s.stored_as, {"tensors": 0, "rel_error_mean": 0.0, "rel_error_max": 0.0, "r_left_max": None}
            )
            d["tensors"] += 1
            d["rel_error_mean"] += s.rel_error
            d["rel_error_max"] = max(d["rel_error_max"], s.rel_error)
            if s.r_left is not None:
                d["r_left_max"] = max(d["r_left_max"] or 0.0, s.r_left)
        for d in out.values():
            d["rel_error_mean"] /= d["tensors"]
        return out


@dataclass
class _Item:
    out: OutTensor
    src: GGUFTensor | None
    transform: ChunkTransform | None
    created: bool = False


def fallback_type(qtype: GGMLQuantizationType, row_size: int) -> GGMLQuantizationType:
    """The writable type closest to `qtype` with at least its bits per weight (F16 when none fits)."""

    def bpw(t: GGMLQuantizationType) -> float:
        block, size = GGML_QUANT_SIZES[t]
        return 8 * size / block

    fits = [t for t in quants.EDITABLE if row_size % GGML_QUANT_SIZES[t][0] == 0 and bpw(t) >= bpw(qtype)]
    return min(fits, key=bpw) if fits else GGMLQuantizationType.F16


def _check_expressible(source: GGUFSource, plan: EditPlan) -> None:
    """A GGUF carries tensors, not a config: edits that change the config or add biases cannot be written."""
    if plan.config is not None:
        changed = sorted(k for k in set(plan.config) | set(source.config) if plan.config.get(k) != source.config.get(k))
        changed = [k for k in changed if k != "tie_word_embeddings"]
        if changed:
            raise RefusalEditError(
                f"this edit changes the model's config ({', '.join(changed)}), which a GGUF file of "
                f"{source.gguf.arch} cannot express; for an addition use `export-cvec` (llama.cpp control "
                "vector) or `layer` 0 (baked into the embedding)"
            )
    for t in plan.new:
        if t.source is None:
            raise RefusalEditError(
                f"this edit adds {t.name}, which llama.cpp's {source.gguf.arch} does not load; for an addition use "
                "`export-cvec` (llama.cpp control vector) or `layer` 0 (baked into the embedding)"
            )


def _layout(source: GGUFSource, plan: EditPlan, notes: list[str]) -> list[_Item]:
    new_by_anchor: dict[str, list] = {}
    for t in plan.new:
        new_by_anchor.setdefault(t.anchor, []).append(t)
    unknown = sorted(set(plan.transforms) - set(source.gguf_of)) + sorted(set(new_by_anchor) - set(source.gguf_of))
    if unknown:
        raise RuntimeError(f"plan names tensors the GGUF does not have: {unknown[:3]}")
    items: list[_Item] = []
    for t in source.gguf.tensors.values():
        hf = source.hf_of[t.name]
        transform = plan.transforms.get(hf)
        qtype = t.qtype
        if transform is not None and not quants.can_quantize(qtype):
            qtype = fallback_type(t.qtype, t.row_size)
            notes.append(f"{t.name}: {t.qtype.name} cannot be requantized; stored as {qtype.name}")
        nbytes = t.nbytes if qtype == t.qtype else t.n_rows * quants.row_bytes(qtype, t.row_size)
        items.append(_Item(OutTensor(t.name, qtype, t.ne, nbytes), t, transform))
        for new in new_by_anchor.get(hf, []):
            src = source.tensor(new.source)
            out = OutTensor(source.gguf_of[new.name], src.qtype, src.ne, src.nbytes)
            if new.transform is not None and not quants.can_quantize(src.qtype):
                raise RefusalEditError(f"{out.name} would need requantizing {src.qtype.name}, which is not supported")
            items.append(_Item(out, src, new.transform, created=True))
    return items


class _Component:
    """Accumulates the norm of a tensor's component along a projection's basis, chunk by chunk."""

    def __init__(self, transform: ChunkTransform) -> None:
        self.transform = transform
        self.acc: torch.Tensor | None = None
        self.sumsq = 0.0

    def add(self, start: int, stop: int, chunk: torch.Tensor) -> None:
        t = self.transform
        if isinstance(t, ProjectFirstDim):
            part = torch.tensordot(t.q[:, start:stop], chunk, dims=1).double()
            self.acc = part if self.acc is None else self.acc + part
        elif isinstance(t, ProjectExperts):
            self.sumsq += float(torch.einsum("kh,ehi->eki", t.q, chunk).double().square().sum())
        elif isinstance(t, ProjectLastDim):
            self.sumsq += float((chunk.reshape(-1, t.q.shape[1]) @ t.q.T).double().square().sum())

    def norm(self) -> float | None:
        if not isinstance(self.transform, ProjectFirstDim | ProjectExperts | ProjectLastDim):
            return None
        return float(self.acc.norm()) if self.acc is not None else math.sqrt(self.sumsq)


class _TensorIO:
    """Chunks of one tensor along HF dim 0: dequantized in, requantized out (with error statistics)."""

    def __init__(self, source: GGUFSource, writer: StreamWriter, item: _Item) -> None:
        src = item.src
        assert src is not None
        self.source, self.writer, self.item, self.src = source, writer, item, src
        self.hf_shape = src.hf_shape
        self.units = src.hf_shape[0] if len(src.ne) > 1 else 1  # 1-D tensors are one chunk
        self.rows_per_unit = src.n_rows // self.units
        per_unit = math.prod(src.ne) // self.units
        step = max(1, CHUNK_BYTES // (4 * per_unit))
        self.ranges = [(s, min(s + step, self.units)) for s in range(0, self.units, step)]
        self.err_sq = 0.0
        self.ref_sq = 0.0
        t, qtype = item.transform, item.out.qtype
        projects = isinstance(t, ProjectFirstDim | ProjectLastDim | ProjectExperts)
        self.rounding = DirectionRounding(t, qtype) if projects and qtype in CODECS else None

    def span(self, rng: tuple[int, int]) -> tuple[int, int]:
        """HF dim-0 index range of a chunk (a 1-D tensor's single chunk spans all its values)."""
        return rng if len(self.src.ne) > 1 else (0, self.hf_shape[0])

    def load(self, rng: tuple[int, int]) -> torch.Tensor:
        s, e = rng
        raw = self.source.gguf.rows(self.src, s * self.rows_per_unit, e * self.rows_per_unit)
        values = quants.dequantize(raw, self.src.qtype, self.src.row_size)
        shape = (e - s, *self.hf_shape[1:]) if len(self.src.ne) > 1 else self.hf_shape
        return torch.from_numpy(values.reshape(shape))

    def store(self, span: tuple[int, int], chunk: torch.Tensor) -> torch.Tensor:
        """Requantize and write a chunk; return what the file now holds (dequantized), for statistics."""
        values = chunk.detach().numpy().reshape(-1, self.src.row_size)
        if not np.isfinite(values).all():
            raise RefusalEditError(f"the edit produced NaN or infinite values in {self.src.name}")
        data = quants.quantize(values, self.item.out.qtype)
        if self.rounding is not None:
            data = self.rounding(*span, values, data, tuple(chunk.shape))
        self.writer.write(self.item.out.name, data)
        back = quants.dequantize(data, self.item.out.qtype, self.src.row_size)
        self.err_sq += float(np.square(back - values, dtype=np.float64).sum())
        self.ref_sq += float(np.square(values, dtype=np.float64).sum())
        return torch.from_numpy(back.reshape(chunk.shape))


def _edit(io: _TensorIO) -> TensorStats:
    t = io.item.transform
    assert t is not None
    before, after = _Component(t), _Component(t)
    whole = t.needs_pass and math.prod(io.src.ne) * 4 <= FLOAT_CACHE_BYTES
    cached = [io.load(r) for r in io.ranges] if whole else None
    if t.needs_pass:
        for i, r in enumerate(io.ranges):
            chunk = cached[i] if cached is not None else io.load(r)
            t.observe(*io.span(r), chunk)
    for i, r in enumerate(io.ranges):
        chunk = cached[i] if cached is not None else io.load(r)
        before.add(*io.span(r), chunk)
        written = io.store(io.span(r), t.apply(*io.span(r), chunk))
        after.add(*io.span(r), written)
    rel = math.sqrt(io.err_sq / io.ref_sq) if io.ref_sq > 0 else 0.0
    return TensorStats(io.src.name, io.src.qtype.name, io.item.out.qtype.name, rel, before.norm(), after.norm())


def summary(stats: list[TensorStats]) -> list[str]:
    """One line per stored type: tensors, largest requantization error, what is left of the removed component."""
    by: dict[str, list[TensorStats]] = {}
    for s in stats:
        by.setdefault(s.stored_as, []).append(s)
    lines = []
    for qtype, group in sorted(by.items()):
        err = max(s.rel_error for s in group)
        left = [s.r_left for s in group if s.r_left is not None]
        tail = f"; component along the edited direction at most {max(left):.2%} of the original" if left else ""
        lines.append(f"requantized {len(group)} {qtype} tensors: relative error at most {err:.4f}{tail}")
    return lines


def write_gguf(
    source: GGUFSource,
    plan: EditPlan,
    out: Path,
    *,
    record: dict[str, Any] | None = None,
    force: bool = False,
    replace_any: bool = False,
    inputs: tuple[Path, ...] = (),
) -> GGUFWriteResult:
    """Write the edited GGUF to `out` atomically (see module docstring); `record` is the edit record to embed."""
    start = time.perf_counter()
    _check_expressible(source, plan)
    notes: list[str] = []
    items = _layout(source, plan, notes)
    gguf = source.gguf
    base = dict(record or {})
    general = metadata.derived(gguf, base.get("base_model"), base.get("mode") != "add" or base.get("coeff", 1) < 0)
    entries = [gguf.raw_entry(k) for k in gguf.keys() if not k.startswith(PREFIX) and not metadata.replaced(k)]
    entries += [pack_entry(k, v) for k, v in general.items()]
    entries += [pack_entry(k, v) for k, v in record_entries(base).items()]
    # The record is rewritten at the end with the measured figures: room for those and a notice per tensor.
    reserve = 2 * len(json.dumps(base)) + 4096 + 200 * len(plan.transforms)
    stats: list[TensorStats] = []
    counts = {"edited": 0, "copied": 0, "created": 0}
    total = sum(i.out.nbytes for i in items)
    with atomic_file(Path(out), force=force, inputs=(source.path, *inputs), replace_any=replace_any) as tmp:
        reserved = {RECORD_KEY: reserve, REQUANT_KEY: 4096}
        writer = StreamWriter(tmp, entries, [i.out for i in items], gguf.alignment, reserved)
        src_fd = gguf.fd()
        try:
            copies = [i for i in items if i.transform is None and i.src is not None and i.out.qtype == i.src.qtype]
            copy_ids = {id(i) for i in copies}
            with progress() as bar, ThreadPoolExecutor(max_workers=1) as pool:
                task = bar.add_task("writing GGUF", total=total)

                def copy_all() -> None:
                    for i in copies:
                        writer.copy(i.out.name, src_fd, i.src.offset, i.src.nbytes)  # type: ignore[union-attr]
                        bar.advance(task, i.out.nbytes)

                job = pool.submit(copy_all)
                try:
                    for item in items:
                        if id(item) in copy_ids:
                            counts["created" if item.created else "copied"] += 1
                            continue
                        stats.append(_edit(_TensorIO(source, writer, item)))
                        counts["created" if item.created else "edited"] += 1
                        bar.advance(task, item.out.nbytes)
                finally:
                    job.result()
            writer.verify()
            result = GGUFWriteResult(Path(out), 0.0, writer.size, tensors=stats, notes=notes, **counts)
            final = dict(base)
            final["notes"] = [*base.get("notes", []), *notes, *summary(stats)]
            final["requantization"] = result.by_type()
            result.record = final
            writer.rewrite(RECORD_KEY, json.dumps(final, indent=1, allow_nan=False, ensure_ascii=False))
            writer.rewrite(REQUANT_KEY, json.dumps(result.by_type()))
        finally:
            writer.close()
            os.close(src_fd)
    result.seconds = time.perf_counter() - start
    return result


def previous_record(source: GGUFSource) -> Any:
    """The edit record embedded in an edited GGUF (a re-edit carries it), or None."""
    text = source.gguf.value(RECORD_KEY)
    return None if text is None else EditRecord.from_json(text, f"{source.path.name}:{RECORD_KEY}")


def record_entries(record: dict[str, Any]) -> dict[str, str | int | float | bool]:
    """The record's scalar fields as flat metadata keys (`refusal_edit.mode`, ...): readable by `gguf-dump`
    and any GGUF reader without parsing the JSON record."""
    flat = {PREFIX + k: v for k, v in record.items() if isinstance(v, str | int | float)}  # bools are ints
    return {k: v for k, v in flat.items() if k not in (RECORD_KEY, REQUANT_KEY)}


__all__ = [
    "GGUFWriteResult",
    "TensorStats",
    "fallback_type",
    "record_entries",
    "summary",
    "write_gguf",
]
