"""An edit as a PEFT LoRA adapter (`adapter_config.json` + `adapter_model.safetensors`): megabytes, not a model.

The factors come from the plan (`refusal_edit.edits.lowrank`), read from the checkpoint's own tensors, so the
adapter equals the weight edit: `lora_B = -alpha Q^T`, `lora_A = Q W` with `lora_alpha = r` (PEFT's scale
`lora_alpha / r` is then 1 and the weight lives in B). Embeddings use PEFT's embedding LoRA
(`lora_embedding_A` [r, V], `lora_embedding_B` [H, r]); GPT-2's Conv1D writers `fan_in_fan_out`. Writers
whose edit is of lower rank (a sandwich norm's gain can shrink the basis) are padded with zeros to one rank.

Tensor names on disk are mapped to the module names of the model in memory (transformers renames some, e.g. a
multimodal wrapper's `language_model.model.` is `model.language_model.` in memory) by building the model on the
meta device and matching each writer by its name under the language model, as the architecture table sees it.

Routed experts, stored one tensor per expert on disk and fused into one [E, H, I] parameter in memory, go through
PEFT's `target_parameters` (its `ParamWrapper`): `lora_A` [E*r, I] expert-major, `lora_B` [H, r*E] with the
layer's one basis repeated for every expert.

What a PEFT LoRA cannot carry is refused with the reason, never dropped: residual biases (PEFT's `lora_bias`
does not exist for embeddings, and a LoRA product cannot add a constant), norm-preserving edits and additions (not
low-rank), what stock PEFT itself refuses to wrap (checked on the meta device before writing), `keep_tied` (PEFT's
embedding LoRA never touches a tied output head, so the adapter is always the exact, untied edit).

A tied output head: at run time the adapter equals the untied checkpoint exactly (the head keeps reading the
original matrix). `merge_and_unload()` merges the embedding change into the shared matrix and so into the head
too, which is the approximate `keep_tied` edit; every other merged tensor equals our checkpoint's.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from refusal_edit.adapters import AdapterResult
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


def check_loadable(model: torch.nn.Module, config: Any, intended: set[str]) -> None:
    """Let PEFT itself wrap the (meta-device) model with the adapter's config, as `PeftModel.from_pretrained` will:
    whatever stock PEFT refuses (e.g. LoRA on a Mamba mixer's out_proj), or would leave unadapted, is an error now,
    before anything is written. `intended`: every module that must end up wrapped.

    PEFT 0.21 under transformers 5 rewrites the targets of some MoE model types at load time (its conversion of
    transformers-4 adapters maps every `*.down_proj` to the fused experts), so a dense or shared-expert down_proj
    of such a model would silently keep its weights: found here by what the injection really wrapped."""
    import peft
    from peft import inject_adapter_in_model

    try:  # on a copy: injection rewrites the config's targets (what it found), which must not be what we save
        inject_adapter_in_model(copy.deepcopy(config), model, low_cpu_mem_usage=True)
    except (ValueError, TypeError, RuntimeError) as exc:
        why = str(exc).splitlines()[0].removeprefix("[PEFT:PeftType.LORA] ")
        raise RefusalEditError(f"stock PEFT cannot load this {WHAT} ({why}); write a checkpoint") from None
    wrapped = {name for name, module in model.named_modules() if hasattr(module, "lora_A")}
    missing = sorted(intended - wrapped)
    if missing:
        raise RefusalEditError(
            f"stock PEFT {peft.__version__} would not adapt {missing[0]} (and {len(missing) - 1} more) of this "
            f"{model.config.model_type} model: it rewrites the targets of this MoE type when loading (its "
            "transformers-4 conversion); write a checkpoint"
        )


def _relative(spec: Any, name: str) -> tuple[str, str] | None:
    """(rule pattern, name below the language model) of a writer, or None."""
    m = classify(spec, name)
    return None if m is None else (m.rule.pattern, name[len(m.prefix) :])


@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor's change goes in memory: a module (`param` its weight), or one expert of a fused
    3-D parameter (PEFT's `target_parameters`)."""

    param: str  # the parameter's name in memory
    expert: int | None = None  # a per-expert tensor on disk, fused in memory: its index


_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def targets(config: dict[str, Any], names: list[str], model: torch.nn.Module) -> dict[str, Target]:
    """Checkpoint tensor name -> where it lives in `model` (as transformers builds it), for the writers in `names`.

    Names below the language model match (a wrapper's prefix differs in memory); routed experts that checkpoints
    store one tensor per expert and transformers fuses into one [E, H, I] parameter go to that parameter."""
    spec = spec_for_config(config)
    params = dict(model.named_parameters())
    embed = next(rule for rule in spec.tensors if rule.site == "embedding")
    scope = next((m.prefix for n in params if (m := classify(spec, n)) is not None and m.rule == embed), "")
    by_relative: dict[str, str] = {}
    fused: dict[int, str] = {}  # layer -> its fused experts parameter
    for n in params:
        m = classify(spec, n)
        if m is None or not n.startswith(scope):
            continue
        by_relative[n[len(m.prefix) :]] = n
        if m.rule.kind == "experts" and m.layer is not None:
            fused[m.layer] = n
    out = {}
    for name in names:
        m = classify(spec, name)
        assert m is not None
        hit = by_relative.get(name[len(m.prefix) :])
        expert = _EXPERT.search(name) if m.rule.per_expert else None
        if hit is None and expert is not None and m.layer in fused:
            out[name] = Target(fused[m.layer], int(expert.group(1)))
        elif hit is None and m.rule.kind == "experts" and m.layer in fused:  # fused on disk too, named otherwise
            out[name] = Target(fused[m.layer])
        elif hit is None:
            raise RefusalEditError(
                f"{name} has no parameter of its own in the model transformers builds: a {WHAT} cannot target it; "
                "write a checkpoint"
            )
        else:
            out[name] = Target(hit)
    return out


def _refuse(factors: list[Factors]) -> None:
    biases = [f.name for f in factors if f.layout == "bias"]
    if biases:
        raise RefusalEditError(
            f"a {WHAT} cannot carry the change of {len(biases)} residual biases (e.g. {biases[0]}): PEFT's "
            "lora_bias does not exist for embeddings and a LoRA product adds no constant; write a checkpoint"
        )


def _fused_pair(parts: dict[int | None, Factors], n_experts: int, param: str) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ParamWrapper factors of a fused [E, H, I] parameter: lora_A [E*r, I] (expert-major), lora_B
    [H, r*E] (rank-major: PEFT reads it as [H, r, E]); from one fused factor or one per expert."""
    if None in parts:  # the checkpoint holds the fused tensor itself: A [E, r, I]
        f = parts[None]
        assert f.a is not None and f.b is not None
        a = f.a
    else:
        if sorted(parts) != list(range(n_experts)):
            raise RefusalEditError(f"{param}: the edit covers {len(parts)} of its {n_experts} experts")
        a = torch.stack([parts[e].a for e in range(n_experts)])  # type: ignore[misc]
        f = parts[0]
    assert f.b is not None
    b = f.b.unsqueeze(-1).expand(-1, -1, n_experts)  # the same basis for every expert of a layer
    return a.reshape(-1, a.shape[-1]).contiguous(), b.reshape(b.shape[0], -1).contiguous()


def adapter_tensors(
    factors: list[Factors],
    where: dict[str, Target],
    shapes: dict[str, tuple[int, ...]],
    rank: int,
    embeddings: set[str],
) -> dict[str, torch.Tensor]:
    """PEFT's saved keys (`base_model.model.<module>.lora_A.weight`, ...) for every factor, padded to `rank`;
    `embeddings` names the factors that are embeddings (PEFT's embedding LoRA), `shapes` the parameters'."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int | None, Factors]] = {}
    for f in factors:
        f = f.padded(rank)
        assert f.a is not None and f.b is not None
        target = where[f.name]
        if target.expert is not None or f.layout == "experts":
            fused.setdefault(target.param, {})[target.expert] = f
            continue
        module = "base_model.model." + target.param.removesuffix(".weight")
        if f.name in embeddings:
            out[f"{module}.lora_embedding_A"] = f.a.contiguous()  # [r, V]
            out[f"{module}.lora_embedding_B"] = f.b.contiguous()  # [H, r]
        else:
            out[f"{module}.lora_A.weight"] = f.a.contiguous()  # [r, in]
            out[f"{module}.lora_B.weight"] = f.b.contiguous()  # [H, r]
    for param, parts in fused.items():
        a, b = _fused_pair(parts, shapes[param][0], param)
        module = "base_model.model." + param.rpartition(".")[0]  # the experts module that holds the parameter
        out[f"{module}.lora_A.weight"], out[f"{module}.lora_B.weight"] = a, b
    return out


def peft_config(
    modules: list[str], rank: int, base_model: str | None, conv1d: bool, parameters: list[str] | None = None
) -> Any:
    """The `LoraConfig` of the adapter: exactly the edited modules (and fused parameters), scale 1, no dropout."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=rank,
        lora_dropout=0.0,
        target_modules=sorted(modules),
        target_parameters=sorted(parameters) if parameters else None,
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
    where = targets(ckpt.config, [f.name for f in factors], model)
    rank = max((f.rank for f in factors), default=0)
    if rank == 0:
        raise RefusalEditError(f"the edit changes no tensor: there is nothing for a {WHAT} to carry")
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    tensors = adapter_tensors(factors, where, shapes, rank, embeddings)
    conv1d = any(kinds[f.name].rule.kind == "conv1d" for f in factors)  # type: ignore[union-attr]
    fused = sorted({t.param for f in factors if (t := where[f.name]).expert is not None or f.layout == "experts"})
    names = sorted({where[f.name].param.removesuffix(".weight") for f in factors} - set(fused))
    config = peft_config(names, rank, base_model, conv1d, fused)
    check_loadable(model, config, {*names, *(p.rpartition(".")[0] for p in fused)})
    with atomic_dir(Path(out), force=force, inputs=[*ckpt.input_paths(), *inputs], replace_any=replace_any) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
        if extra_files is not None:
            extra_files(tmp)
        size = sum(p.stat().st_size for p in tmp.iterdir() if p.name == WEIGHTS)
    fused_note = f" and {len(fused)} fused expert parameters" if fused else ""
    notes = [f"rank {rank} LoRA on {len(names)} modules{fused_note} ({size / 1e3:.0f} KB of adapter weights)"]
    if plan.new:
        notes.append(
            "tied output head: base + adapter is the exact (untied) edit; merge_and_unload() would merge the "
            "embedding change into the tied head too (the approximate keep_tied edit)"
        )
    seconds = time.perf_counter() - start
    return AdapterResult(Path(out), rank, [*names, *fused], size, seconds, notes, edited=len(names) + len(fused))


def read_config(folder: Path) -> dict[str, Any]:
    """The adapter's config as JSON (for checks)."""
    return json.loads((Path(folder) / CONFIG).read_text())
