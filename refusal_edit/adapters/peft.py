"""An edit as a PEFT LoRA adapter (`adapter_config.json` + `adapter_model.safetensors`): megabytes, not a model.

The factors come from the plan (`refusal_edit.edits.lowrank`), read from the checkpoint's own tensors, so the
adapter equals the weight edit: `lora_B = -alpha Q^T`, `lora_A = Q W` with `lora_alpha = r` (PEFT's scale
`lora_alpha / r` is then 1 and the weight lives in B). Embeddings use PEFT's embedding LoRA
(`lora_embedding_A` [r, V], `lora_embedding_B` [H, r]); GPT-2's Conv1D writers `fan_in_fan_out`. Writers
whose edit is of lower rank (a sandwich norm's gain can shrink the basis) are padded with zeros to one rank.

Tensor names on disk are mapped to the module names of the model in memory (transformers renames some, e.g. a
multimodal wrapper's `language_model.model.` is `model.language_model.` in memory) by building the model on the
meta device and matching each writer by its name under the language model, as the architecture table sees it.

What a PEFT LoRA cannot carry is refused with the reason, never dropped: residual biases (PEFT's `lora_bias`
does not exist for embeddings, and a LoRA product cannot add a constant), fused experts (a 3-D parameter is not
a module PEFT's LoRA wraps), norm-preserving edits and additions (not low-rank), `keep_tied` (PEFT's embedding
LoRA never touches a tied output head, so the adapter is always the exact, untied edit).

A tied output head: at run time the adapter equals the untied checkpoint exactly (the head keeps reading the
original matrix). `merge_and_unload()` merges the embedding change into the shared matrix and so into the head
too, which is the approximate `keep_tied` edit; every other merged tensor equals our checkpoint's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from refusal_edit.arch import classify, spec_for_config, stock_model_class
from refusal_edit.checkpoint.atomic import atomic_dir
from refusal_edit.checkpoint.layout import Checkpoint
from refusal_edit.checkpoint.safetensors_io import TensorReader, chunk_rows
from refusal_edit.edits.lowrank import Factors, plan_factors
from refusal_edit.edits.plan import EditPlan
from refusal_edit.errors import RefusalEditError

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
WHAT = "PEFT LoRA adapter"


@dataclass
class AdapterResult:
    out: Path
    rank: int
    modules: list[str]
    bytes_written: int
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    # WriteResult-like counts, so the CLI shows every output alike
    edited: int = 0
    copied: int = 0
    created: int = 0
    warnings: list[str] = field(default_factory=list)


def checkpoint_chunks(ckpt: Checkpoint, name: str) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Float32 row chunks of one checkpoint tensor (read, never written)."""
    hit = ckpt.find(name)
    if hit is None:
        raise RefusalEditError(f"missing tensor {name}")
    shard, info = hit
    with TensorReader(shard) as reader:
        for start, stop in chunk_rows(info):
            yield start, stop, reader.rows(info, start, stop).float()


def meta_model(config: dict[str, Any], root: Path | None = None) -> torch.nn.Module:
    """The model transformers builds from `config` (read from `root` when given: config.json as transformers reads
    it), on the meta device: no memory."""
    from transformers import AutoConfig

    try:
        hf = AutoConfig.from_pretrained(str(root)) if root is not None else AutoConfig.for_model(**config)
        with torch.device("meta"):
            return stock_model_class(config)._from_config(hf)
    except Exception as exc:
        raise RefusalEditError(f"cannot build the model from its config: {exc}") from None


def check_loadable(model: torch.nn.Module, config: Any) -> None:
    """Let PEFT itself wrap the (meta-device) model with the adapter's config: whatever stock PEFT would refuse to
    load (e.g. LoRA on a Mamba mixer's out_proj) is an error now, before anything is written."""
    from peft import inject_adapter_in_model

    try:
        inject_adapter_in_model(config, model, low_cpu_mem_usage=True)
    except (ValueError, TypeError, RuntimeError) as exc:
        why = str(exc).splitlines()[0].removeprefix("[PEFT:PeftType.LORA] ")
        raise RefusalEditError(f"stock PEFT cannot load this {WHAT} ({why}); write a checkpoint") from None


def _relative(spec: Any, name: str) -> tuple[str, str] | None:
    """(rule pattern, name below the language model) of a writer, or None."""
    m = classify(spec, name)
    return None if m is None else (m.rule.pattern, name[len(m.prefix) :])


def module_map(config: dict[str, Any], names: list[str], model: torch.nn.Module) -> dict[str, str]:
    """Checkpoint tensor name -> parameter name in `model` (as transformers builds it), for the writers in `names`."""
    spec = spec_for_config(config)
    params = dict(model.named_parameters())
    embed = next(rule for rule in spec.tensors if rule.site == "embedding")
    scope = next((m.prefix for n in params if (m := classify(spec, n)) is not None and m.rule == embed), "")
    by_relative = {}
    for n in params:
        rel = _relative(spec, n)
        if rel is not None and n.startswith(scope):
            by_relative[rel[1]] = n
    out = {}
    for name in names:
        rel = _relative(spec, name)
        hit = by_relative.get(rel[1]) if rel else None
        if hit is None:
            raise RefusalEditError(
                f"a {WHAT} cannot carry fused experts: {name} is one of the experts transformers fuses into a 3-D "
                "parameter in memory, not a module PEFT's LoRA wraps; write a checkpoint, or a GGUF"
            )
        out[name] = hit
    return out


def _refuse(factors: list[Factors]) -> None:
    biases = [f.name for f in factors if f.layout == "bias"]
    if biases:
        raise RefusalEditError(
            f"a {WHAT} cannot carry the change of {len(biases)} residual biases (e.g. {biases[0]}): PEFT's "
            "lora_bias does not exist for embeddings and a LoRA product adds no constant; write a checkpoint"
        )
    experts = [f.name for f in factors if f.layout == "experts"]
    if experts:
        raise RefusalEditError(
            f"a {WHAT} cannot carry fused experts (e.g. {experts[0]}: a 3-D parameter, not a module PEFT's LoRA "
            "wraps); write a checkpoint, or a GGUF"
        )


def adapter_tensors(
    factors: list[Factors], modules: dict[str, str], rank: int, embeddings: set[str]
) -> dict[str, torch.Tensor]:
    """PEFT's saved keys (`base_model.model.<module>.lora_A.weight`, ...) for every factor, padded to `rank`;
    `embeddings` names the factors that are embeddings (PEFT's embedding LoRA)."""
    out: dict[str, torch.Tensor] = {}
    for f in factors:
        f = f.padded(rank)
        assert f.a is not None and f.b is not None
        module = "base_model.model." + modules[f.name].removesuffix(".weight")
        if f.name in embeddings:
            out[f"{module}.lora_embedding_A"] = f.a.contiguous()  # [r, V]
            out[f"{module}.lora_embedding_B"] = f.b.contiguous()  # [H, r]
        else:
            out[f"{module}.lora_A.weight"] = f.a.contiguous()  # [r, in]
            out[f"{module}.lora_B.weight"] = f.b.contiguous()  # [H, r]
    return out


def peft_config(modules: list[str], rank: int, base_model: str | None, conv1d: bool) -> Any:
    """The `LoraConfig` of the adapter: exactly the edited modules, scale 1, no dropout."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=rank,
        lora_dropout=0.0,
        target_modules=sorted(modules),
        fan_in_fan_out=conv1d,
        bias="none",
        base_model_name_or_path=base_model,
        task_type="CAUSAL_LM",
    )


def write_peft(
    ckpt: Checkpoint,
    plan: EditPlan,
    out: Path,
    *,
    base_model: str | None,
    extra_files: Any = None,
    force: bool = False,
    replace_any: bool = False,
    inputs: tuple[Path, ...] = (),
) -> AdapterResult:
    """Write the plan as a PEFT LoRA adapter folder (atomically); `extra_files(tmp)` adds the record and card."""
    import time

    from safetensors.torch import save_file

    start = time.perf_counter()
    if any(t.source is None for t in plan.new):
        raise RefusalEditError(f"this edit creates tensors ({plan.new[0].name}), which a {WHAT} cannot carry")
    spec = plan.spec
    kinds = {name: classify(spec, name) for name in plan.transforms}

    def is_bias(name: str) -> bool:
        m = kinds[name]
        return m is not None and m.rule.kind in ("bias", "experts_bias")

    factors = plan_factors(plan, lambda n: checkpoint_chunks(ckpt, n), is_bias, WHAT)
    _refuse(factors)
    embeddings = {f.name for f in factors if kinds[f.name].rule.kind == "embedding"}  # type: ignore[union-attr]
    model = meta_model(ckpt.config, ckpt.root)
    modules = module_map(ckpt.config, [f.name for f in factors], model)
    rank = max((f.rank for f in factors), default=0)
    if rank == 0:
        raise RefusalEditError(f"the edit changes no tensor: there is nothing for a {WHAT} to carry")
    tensors = adapter_tensors(factors, modules, rank, embeddings)
    conv1d = any(kinds[f.name].rule.kind == "conv1d" for f in factors)  # type: ignore[union-attr]
    names = [modules[f.name].removesuffix(".weight") for f in factors]
    config = peft_config(names, rank, base_model, conv1d)
    check_loadable(model, config)
    with atomic_dir(Path(out), force=force, inputs=[*ckpt.input_paths(), *inputs], replace_any=replace_any) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
        if extra_files is not None:
            extra_files(tmp)
        size = sum(p.stat().st_size for p in tmp.iterdir() if p.name == WEIGHTS)
    notes = [f"rank {rank} LoRA on {len(names)} modules ({size / 1e3:.0f} KB of adapter weights)"]
    if plan.new:
        notes.append(
            "tied output head: base + adapter is the exact (untied) edit; merge_and_unload() would merge the "
            "embedding change into the tied head too (the approximate keep_tied edit)"
        )
    return AdapterResult(Path(out), rank, names, size, time.perf_counter() - start, notes, edited=len(names))


def read_config(folder: Path) -> dict[str, Any]:
    """The adapter's config as JSON (for checks)."""
    return json.loads((Path(folder) / CONFIG).read_text())
