"""An edit as a llama.cpp LoRA adapter GGUF (`--lora FILE`, llama-cpp-python's `lora_path=`, Ollama's `ADAPTER`).

Directional ablation at run time, on the user's own (quantized) GGUF, without a new model file: what a control
vector cannot express. The factors come from the plan on the GGUF itself (`refusal_edit.edits.lowrank` over
the dequantized base tensors), so `W + B A` removes the direction from exactly the weights llama.cpp holds,
in float, with no requantization of the base.

The layout llama.cpp reads (src/llama-adapter.cpp, src/llama-graph.cpp), facts only:
- metadata `general.type = adapter`, `general.architecture` = the base model's, `adapter.type = lora`,
  `adapter.lora.alpha` (float32); each product is scaled by alpha / rank, rank = `lora_b`'s ne0. We write
  alpha = rank (scale 1) and pad every pair to one rank;
- a pair `<base tensor name>.lora_a` / `.lora_b` per base tensor. A matrix W with ne [in, out] (HF [out, in]):
  `lora_a` ne [in, r], `lora_b` ne [r, out], and W x + B (A x): as numpy arrays exactly PEFT's A [r, in] and
  B [out, r]. `token_embd.weight` (ne [H, V]) is flipped: `lora_a` ne [r, V] and `lora_b` ne [r, H], the
  row of a token being b @ a[token] (numpy a [V, r], b [H, r]). Fused experts (ne [I, H, E]) take 3-D pairs:
  `lora_a` ne [I, r, E], `lora_b` ne [r, H, E];
- llama.cpp looks a tensor's adapter up by name, so a tied model's output head (the `token_embd.weight`
  tensor reused) would get the embedding's pair too, with the wrong shapes: refused.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from refusal_edit import __version__
from refusal_edit.adapters import AdapterResult
from refusal_edit.arch import classify
from refusal_edit.checkpoint.layout import Checkpoint
from refusal_edit.edits.lowrank import Factors, plan_factors
from refusal_edit.edits.plan import EditPlan
from refusal_edit.errors import RefusalEditError
from refusal_edit.gguf import metadata, quants
from refusal_edit.gguf.hf_view import GGUFSource
from refusal_edit.gguf.names import gguf_names
from refusal_edit.gguf.writer import atomic_file

WHAT = "llama.cpp LoRA adapter"
DTYPES = ("F32", "F16")
CHUNK_BYTES = 64 << 20


def gguf_chunks(source: GGUFSource, name: str) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Dequantized float32 chunks of a GGUF tensor along HF dim 0 (whole stored rows)."""
    t = source.tensor(name)
    shape = t.hf_shape
    if len(t.ne) < 2:
        values = quants.dequantize(source.gguf.rows(t, 0, t.n_rows), t.qtype, t.row_size)
        yield 0, shape[0], torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))
        return
    units = shape[0]
    rows_per_unit = t.n_rows // units
    per_unit = max(1, 4 * t.n_rows * t.row_size // units)
    step = max(1, CHUNK_BYTES // per_unit)
    for s in range(0, units, step):
        e = min(s + step, units)
        raw = source.gguf.rows(t, s * rows_per_unit, e * rows_per_unit)
        values = quants.dequantize(raw, t.qtype, t.row_size)
        yield s, e, torch.from_numpy(np.array(values, dtype=np.float32).reshape(e - s, *shape[1:]))


def _refuse_biases(factors: list[Factors], gguf_name: Callable[[str], str], instead: str) -> None:
    biases = [f.name for f in factors if f.layout == "bias"]
    if biases:
        raise RefusalEditError(
            f"a {WHAT} cannot carry the change of {len(biases)} residual biases (e.g. "
            f"{gguf_name(biases[0])}): llama.cpp adapters hold lora_a / lora_b pairs only; {instead}"
        )


def _refuse(source: GGUFSource, factors: list[Factors]) -> None:
    _refuse_biases(factors, lambda n: source.gguf_of[n], "write an edited GGUF")
    tied = "output.weight" not in source.gguf.tensors
    if tied and any(source.gguf_of[f.name] == "token_embd.weight" for f in factors):
        raise RefusalEditError(
            f"{source.path.name} ties its output head to token_embd.weight, and llama.cpp would apply the "
            f"embedding's adapter to the head too: a {WHAT} cannot carry this edit; write an edited GGUF (untied)"
        )


def pair(f: Factors, embedding: bool) -> tuple[np.ndarray, np.ndarray]:
    """(lora_a, lora_b) as numpy arrays in llama.cpp's layout (see module docstring)."""
    assert f.a is not None and f.b is not None
    a, b = f.a.float(), f.b.float()
    if f.layout == "experts":  # a [E, r, I]; b the same [H, r] for every expert
        return a.numpy(), b.unsqueeze(0).expand(a.shape[0], -1, -1).contiguous().numpy()
    if embedding:  # numpy a [V, r], b [H, r]
        return a.T.contiguous().numpy(), b.contiguous().numpy()
    return a.contiguous().numpy(), b.contiguous().numpy()  # a [r, in], b [out, r]


def _is_bias(plan: EditPlan):
    kinds = {name: classify(plan.spec, name) for name in plan.transforms}

    def is_bias(name: str) -> bool:
        m = kinds[name]
        return m is not None and m.rule.kind in ("bias", "experts_bias")

    return is_bias


def write_gguf_lora(
    source: GGUFSource | Checkpoint,
    plan: EditPlan,
    out: Path,
    *,
    record: dict[str, Any] | None = None,
    dtype: str = "F32",
    force: bool = False,
    replace_any: bool = False,
    inputs: tuple[Path, ...] = (),
) -> AdapterResult:
    """Write the plan as a llama.cpp LoRA adapter GGUF (atomically) for the base GGUF `source`, or for the HF
    checkpoint `source` as llama.cpp converts it (`convert_hf_to_gguf.py`, any quantization: GGUF names from
    `gguf.names`; the same factors as the PEFT adapter, the same layout, HF shapes being GGUF shapes reversed)."""
    base_model = (record or {}).get("base_model")
    if isinstance(source, GGUFSource):
        factors = plan_factors(plan, lambda n: gguf_chunks(source, n), _is_bias(plan), WHAT)
        _refuse(source, factors)
        general = metadata.derived(source.gguf, base_model)
        arch, names, paths = source.gguf.arch, source.gguf_of, [source.path]
    else:
        arch, names = gguf_names(source.config)
        factors = _hf_factors(source, plan, names)
        general = metadata.derived(None, base_model, name=source.root.name)
        paths = source.input_paths()
    return _write(arch, general, factors, names, out, record, dtype, force, replace_any, (*paths, *inputs))


def _hf_factors(ckpt: Checkpoint, plan: EditPlan, names: Mapping[str, str]) -> list[Factors]:
    """The factors of an HF checkpoint's edit, refusing what llama.cpp cannot take (see `_refuse`)."""
    from refusal_edit.adapters.peft import checkpoint_chunks

    if any(t.source is not None for t in plan.new):
        raise RefusalEditError(
            f"{ckpt.root.name} ties its output head to its embeddings, and llama.cpp would apply the embedding's "
            f"adapter to the head too: a {WHAT} cannot carry this edit; write a checkpoint (untied) and convert that"
        )
    if plan.new:
        raise RefusalEditError(f"this edit creates tensors ({plan.new[0].name}), which a {WHAT} cannot carry")
    factors = plan_factors(plan, lambda n: checkpoint_chunks(ckpt, n), _is_bias(plan), WHAT)
    _refuse_biases(factors, lambda n: names.get(n, n), "write a checkpoint and convert it")
    unnamed = [f.name for f in factors if f.name not in names]
    if unnamed:
        raise RefusalEditError(f"{unnamed[0]} has no GGUF tensor name in llama.cpp's layout")
    return factors


def _write(
    arch: str,
    general: dict[str, Any],
    factors: list[Factors],
    gguf_of: Mapping[str, str],
    out: Path,
    record: dict[str, Any] | None,
    dtype: str,
    force: bool,
    replace_any: bool,
    inputs: tuple[Path, ...],
) -> AdapterResult:
    import json

    from gguf import GGUFWriter

    if dtype not in DTYPES:
        raise RefusalEditError(f"unknown adapter type {dtype!r} ({', '.join(DTYPES)})")
    start = time.perf_counter()
    rank = max((f.rank for f in factors), default=0)
    if rank == 0:
        raise RefusalEditError(f"the edit changes no tensor: there is nothing for a {WHAT} to carry")
    np_type = np.float32 if dtype == "F32" else np.float16
    names: list[str] = []
    with atomic_file(Path(out), force=force, inputs=inputs, replace_any=replace_any) as tmp:
        w = GGUFWriter(str(tmp), arch)
        w.add_type("adapter")
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", float(rank))
        general = {**general, "general.name": general["general.name"] + " LoRA"}
        for key, value in general.items():
            if isinstance(value, tuple):
                w.add_uint32(key, value[0])
            elif isinstance(value, list):
                w.add_array(key, value)
            else:
                w.add_string(key, value)
        w.add_string("refusal_edit.tool_version", __version__)
        if record is not None:
            w.add_string("refusal_edit.record", json.dumps(record, allow_nan=False, ensure_ascii=False))
        for f in factors:
            f = f.padded(rank)
            gguf_name = gguf_of[f.name]
            a, b = pair(f, embedding=gguf_name == "token_embd.weight")
            w.add_tensor(f"{gguf_name}.lora_a", a.astype(np_type))
            w.add_tensor(f"{gguf_name}.lora_b", b.astype(np_type))
            names.append(gguf_name)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        size = tmp.stat().st_size
    notes = [f"rank {rank} llama.cpp LoRA on {len(names)} tensors ({dtype}, {size / 1e3:.0f} KB)"]
    return AdapterResult(Path(out), rank, names, size, time.perf_counter() - start, notes, edited=len(names))
