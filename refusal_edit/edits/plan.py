"""Decide, from the architecture table and a checkpoint's headers, what the weight edit does.

An `EditPlan` maps tensor names to chunk transforms, lists tensors to create (an untied `lm_head`,
explicit zero biases for flags that create a whole group) and the new config. Nothing is read beyond
headers and the small norm weights; nothing is written here.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from refusal_edit.arch import ArchSpec, BiasRoute, TensorMatch, classify, get_spec
from refusal_edit.checkpoint.layout import Checkpoint
from refusal_edit.checkpoint.safetensors_io import TensorInfo, TensorReader
from refusal_edit.edits.ops import (
    AddFirstDim,
    AddLastDim,
    ChunkTransform,
    ProjectExperts,
    ProjectFirstDim,
    ProjectLastDim,
)
from refusal_edit.errors import RefusalEditError
from refusal_edit.interventions import unit


@dataclass
class NewTensor:
    """A tensor the output gains: a copy of `source` (or zeros), optionally transformed."""

    name: str
    shard: str
    dtype: str
    shape: tuple[int, ...]
    source: str | None = None
    transform: ChunkTransform | None = None


@dataclass
class EditPlan:
    mode: str
    spec: ArchSpec
    transforms: dict[str, ChunkTransform] = field(default_factory=dict)
    new: list[NewTensor] = field(default_factory=list)
    config: dict[str, Any] | None = None  # the rewritten config.json, None when unchanged
    notes: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def count(self, label: str) -> None:
        self.counts[label] = self.counts.get(label, 0) + 1


class ConfigView:
    """The text config as config.json states it; a key the file leaves out is answered by transformers'
    resolved config (the class default, e.g. Gemma's `tie_word_embeddings=True`), loaded only then.

    Loading transformers' config machinery takes over a second, most of a small edit's run time, and
    config.json files written by `save_pretrained` state every key.
    """

    def __init__(self, data: dict[str, Any], root: Path, aliases: dict[str, str]) -> None:
        self._data, self._root, self._aliases, self._full = data, root, aliases, None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        for key in (self._aliases.get(name, name), name):
            if key in self._data:
                return self._data[key]
        if self._full is None:
            from transformers import AutoConfig

            from refusal_edit.arch import text_config

            try:
                self._full = text_config(AutoConfig.from_pretrained(str(self._root)))
            except Exception as exc:
                raise RefusalEditError(f"cannot read config.json: {exc}") from exc
        return getattr(self._full, name)


def resolved_config(ckpt: Checkpoint) -> Any:
    """The text config of the checkpoint (see `ConfigView`); quantized and unsupported models are errors."""
    if ckpt.config.get("quantization_config"):
        method = ckpt.config["quantization_config"].get("quant_method", "?")
        raise RefusalEditError(f"quantized checkpoints ({method}) cannot be edited; use the unquantized model")
    spec = get_spec(text_config_type(ckpt.config))
    data = ckpt.config.get("text_config") or ckpt.config
    return ConfigView({"model_type": spec.model_type, **data}, ckpt.root, dict(spec.config_aliases))


def text_config_type(config: dict[str, Any]) -> str | None:
    return (config.get("text_config") or {}).get("model_type") or config.get("model_type")


def set_config(config: dict[str, Any], key: str, value: Any) -> None:
    """Set a key on the top-level config and, for wrapped models, on the text config too."""
    config[key] = value
    if isinstance(config.get("text_config"), dict):
        config["text_config"][key] = value


def layer_prefix(name: str, spec: ArchSpec, layer: int) -> str:
    m = re.match(rf"(.*?\.)?{re.escape(spec.layers)}\.{layer}\.", name)
    return (m.group(1) or "") if m else ""


def _matches(ckpt: Checkpoint, spec: ArchSpec) -> list[tuple[TensorMatch, TensorInfo]]:
    out = []
    for shard in ckpt.shards:
        for name, info in shard.tensors.items():
            m = classify(spec, name)
            if m is not None:
                out.append((m, info))
    return out


def _check_complete(spec: ArchSpec, cfg: Any, found: list[tuple[TensorMatch, TensorInfo]]) -> None:
    """Every layer must have its attention and MLP writers (and every expert): never a partial edit."""
    n_layers = int(cfg.num_hidden_layers)
    weights = [m for m, _ in found if m.rule.kind != "bias"]
    if not any(m.rule.site == "embedding" for m in weights):
        raise RefusalEditError(f"checkpoint does not match the {spec.model_type} layout: no embedding found")
    n_experts = spec.num_experts(cfg)
    for layer in range(n_layers):
        here = [m for m in weights if m.layer == layer]
        for site in ("attn", "mlp"):
            if not any(m.rule.site == site for m in here):
                raise RefusalEditError(
                    f"checkpoint does not match the {spec.model_type} layout: layer {layer} has no {site} "
                    "output projection"
                )
        experts = [m for m in here if m.rule.per_expert]
        if experts and n_experts and len(experts) != n_experts:
            raise RefusalEditError(
                f"layer {layer} has {len(experts)} expert output projections, the config says {n_experts}"
            )


def _check_float(info: TensorInfo) -> None:
    if not info.is_float:
        raise RefusalEditError(f"tensor {info.name} is stored as {info.dtype}: quantized weights cannot be edited")


def _writer_units(
    ckpt: Checkpoint, spec: ArchSpec, found: list[tuple[TensorMatch, TensorInfo]], r: torch.Tensor
) -> dict[tuple[int, str], torch.Tensor | None]:
    """u per (layer, site): r, or normalize(g * r) where a sandwich norm follows the writer."""
    units: dict[tuple[int, str], torch.Tensor | None] = {}
    for m, _ in found:
        if m.layer is None or (m.layer, m.rule.site) in units:
            continue
        norm = spec.post_norm_name(m.layer, m.rule.site)  # type: ignore[arg-type]
        if norm is None:
            units[m.layer, m.rule.site] = r
            continue
        name = layer_prefix(m.name, spec, m.layer) + norm
        hit = ckpt.find(name)
        if hit is None:
            raise RefusalEditError(f"missing norm weight {name} (needed for the {spec.model_type} edit)")
        with TensorReader(hit[0]) as rd:
            g = rd.tensor(hit[1]).float() + spec.norm_offset
        scaled = g * r
        n = scaled.norm()
        units[m.layer, m.rule.site] = None if n == 0 else scaled / n
    return units


def _projection(match: TensorMatch, info: TensorInfo, u: torch.Tensor, hidden: int) -> ChunkTransform:
    kind, shape = match.rule.kind, info.shape
    if kind in ("embedding", "conv1d"):
        axis_ok, transform = shape[-1] == hidden, ProjectLastDim(u)
    elif kind in ("linear", "bias"):
        axis_ok, transform = shape[0] == hidden, ProjectFirstDim(u)
    elif len(shape) == 3 and shape[1] == hidden:
        axis_ok, transform = True, ProjectExperts(u)
    else:  # fused experts stored [E, I, H]
        axis_ok, transform = len(shape) == 3 and shape[2] == hidden, ProjectLastDim(u)
    if not axis_ok:
        raise RefusalEditError(f"tensor {info.name} has shape {list(shape)}; expected hidden size {hidden}")
    return transform


def _token_embedding(
    found: list[tuple[TensorMatch, TensorInfo]], ckpt: Checkpoint, spec: ArchSpec
) -> tuple[TensorInfo, str]:
    """The token embedding: by convention the first embedding rule of the table."""
    first = next(rule for rule in spec.tensors if rule.site == "embedding")
    for m, info in found:
        if m.rule == first:
            shard = next(s for s in ckpt.shards if m.name in s.tensors)
            return info, shard.path.name
    raise RefusalEditError("no token embedding found")


def _untie(plan: EditPlan, ckpt: Checkpoint, cfg: Any, found, keep_tied: bool) -> None:
    """Tied head + edited embedding: write the original matrix as the head (exact), unless kept tied."""
    if not getattr(cfg, "tie_word_embeddings", False):
        return
    if keep_tied:
        plan.notes.append(
            "embeddings kept tied: the output head is the edited embedding too (approximate: the final "
            "norm re-introduces an r component, so logits differ from exact ablation)"
        )
        return
    embed, shard = _token_embedding(found, ckpt, plan.spec)
    head = plan.spec.lm_head
    if ckpt.find(head) is None:
        plan.new.append(NewTensor(head, shard, embed.dtype, embed.shape, source=embed.name))
    plan.config = plan.config or copy.deepcopy(ckpt.config)
    set_config(plan.config, "tie_word_embeddings", False)
    plan.notes.append(f"untied embeddings: {head} keeps the original matrix (exact)")


def plan_ablation(ckpt: Checkpoint, direction: torch.Tensor, keep_tied: bool = False) -> EditPlan:
    """Orthogonalize every residual writer against the direction (see `refusal_edit.arch`)."""
    cfg = resolved_config(ckpt)
    spec = get_spec(cfg.model_type)
    hidden = int(cfg.hidden_size)
    r = unit(direction)
    if r.numel() != hidden:
        raise RefusalEditError(f"direction has size {r.numel()}, the model's hidden size is {hidden}")
    found = _matches(ckpt, spec)
    _check_complete(spec, cfg, found)
    units = _writer_units(ckpt, spec, found, r)
    plan = EditPlan("ablate", spec)
    for m, info in found:
        _check_float(info)
        u = r if m.layer is None else units[m.layer, m.rule.site]
        if u is None:
            plan.notes.append(f"{m.name}: the norm gain already removes r; left unchanged")
            continue
        plan.transforms[m.name] = _projection(m, info, u, hidden)
        plan.count(m.rule.kind)
    _untie(plan, ckpt, cfg, found, keep_tied)
    if spec.post_norms:
        plan.notes.append(spec.notes)
    return plan


def _choose_route(spec: ArchSpec, cfg: Any, site: str) -> BiasRoute | None:
    routes = [r for r in spec.bias_routes if r.site == site]
    for route in routes:  # prefer a route whose biases already exist: no config change
        if route.relabel is None and (route.flag is None or getattr(cfg, route.flag, False)):
            return route
    return routes[0] if routes else None


def _route_error(spec: ArchSpec, layer: int, site: str) -> RefusalEditError:
    other = sorted({r.site for r in spec.bias_routes} - {site})
    if site == "input" and spec.post_norms:
        why = "a norm sits between its projections and the residual add"
    else:
        why = f"no stock bias writes at the {site} site"
    alternatives = ["--layer 0 (baked into the embedding)"] if site == "input" else []
    alternatives += [f"--site {o}" for o in other]
    alternatives.append("the run-time hook (refusal-edit evaluate --intervention add)")
    return RefusalEditError(
        f"cannot bake an addition at layer {layer} ({site} site) into {spec.model_type} with stock transformers "
        f"({why}); alternatives: {', '.join(alternatives)}"
    )


def _fill_group(plan: EditPlan, ckpt: Checkpoint, spec: ArchSpec, prefix: str, n_layers: int, route: BiasRoute) -> None:
    """A flag creates every bias of its group in every layer: write explicit zeros for the missing ones."""
    for lyr in range(n_layers):
        for module in route.group:
            bias = f"{prefix}{spec.layers}.{lyr}.{module}.bias"
            if ckpt.find(bias) is not None or any(t.name == bias for t in plan.new):
                continue
            hit = ckpt.find(f"{prefix}{spec.layers}.{lyr}.{module}.weight")
            if hit is None:
                raise RefusalEditError(f"missing {prefix}{spec.layers}.{lyr}.{module}.weight for the bias route")
            shard, weight = hit
            plan.new.append(NewTensor(bias, shard.path.name, weight.dtype, (weight.shape[0],)))
            plan.count("zero bias")


def plan_addition(
    ckpt: Checkpoint, vector: torch.Tensor, layer: int, site: str = "input", keep_tied: bool = False
) -> EditPlan:
    """Bake `vector` as a constant added to the residual stream at `site` of `layer`.

    site "input": at the input of `layer` (layer 0: every embedding row; else the MLP-output bias of
    layer - 1). site "attn": after the attention of `layer` (its output-projection bias).
    """
    cfg = resolved_config(ckpt)
    spec = get_spec(cfg.model_type)
    hidden = int(cfg.hidden_size)
    n_layers = int(cfg.num_hidden_layers)
    v = vector.detach().float()
    if v.numel() != hidden:
        raise RefusalEditError(f"vector has size {v.numel()}, the model's hidden size is {hidden}")
    if not torch.isfinite(v).all():
        raise RefusalEditError("the vector to add contains NaN or infinite values")
    if not 0 <= layer < n_layers:
        raise RefusalEditError(f"layer {layer} is out of range: the model has {n_layers} layers")
    if site not in ("input", "attn"):
        raise RefusalEditError(f"unknown site {site!r} (input, attn)")
    found = _matches(ckpt, spec)
    _check_complete(spec, cfg, found)
    plan = EditPlan("add", spec)
    if layer == 0 and site == "input":
        embed, _ = _token_embedding(found, ckpt, spec)
        _check_float(embed)
        plan.transforms[embed.name] = AddLastDim(v / spec.embed_scale(cfg))
        plan.count("embedding")
        plan.notes.append("layer 0: the vector is added to every embedding row")
        _untie(plan, ckpt, cfg, found, keep_tied)
        return plan
    route = _choose_route(spec, cfg, site)
    if route is None:
        raise _route_error(spec, layer, site)
    writer_layer = layer - 1 if site == "input" else layer
    anchor = next(m.name for m, _ in found if m.layer == writer_layer and m.rule.site == "attn")
    prefix = layer_prefix(anchor, spec, writer_layer)
    target = f"{prefix}{spec.layers}.{writer_layer}.{route.target}.bias"
    add = AddFirstDim(v / spec.residual_scale(cfg))
    if route.relabel:
        _relabel(plan, ckpt, cfg, route.relabel)
        # The relabelled architecture keeps the biases that already exist only if their flags are on.
        for other in get_spec(route.relabel).bias_routes:
            if other.flag and any(ckpt.find(f"{prefix}{spec.layers}.0.{m}.bias") for m in other.group):
                set_config(plan.config, other.flag, True)  # type: ignore[arg-type]
                _fill_group(plan, ckpt, spec, prefix, n_layers, other)
    if route.flag is not None and not getattr(cfg, route.flag, False):
        plan.config = plan.config or copy.deepcopy(ckpt.config)
        set_config(plan.config, route.flag, True)
        plan.notes.append(f"config: {route.flag}=true (the other biases it creates are written as zeros)")
    _fill_group(plan, ckpt, spec, prefix, n_layers, route)
    new_target = next((t for t in plan.new if t.name == target), None)
    if new_target is not None:
        new_target.transform = add
    elif ckpt.find(target) is not None:
        plan.transforms[target] = add
    else:
        raise RefusalEditError(f"{target} does not exist and no config flag creates it")
    plan.count("bias")
    where = f"input of layer {layer}" if site == "input" else f"output of layer {layer}'s attention"
    plan.notes.append(f"the vector is added at the {where} via {route.target}.bias of layer {writer_layer}")
    return plan


def _relabel(plan: EditPlan, ckpt: Checkpoint, cfg: Any, target: str) -> None:
    """Express the model as another stock architecture that computes the same function (Llama)."""
    plan.config = plan.config or copy.deepcopy(ckpt.config)
    original = plan.config.get("model_type")
    plan.config["model_type"] = target
    plan.config["architectures"] = [{"llama": "LlamaForCausalLM"}[target]]
    plan.notes.append(f"config: {original} relabelled as {plan.config['architectures'][0]} (identical computation)")
    window = getattr(cfg, "sliding_window", None)
    uses_window = getattr(cfg, "use_sliding_window", window is not None)
    if window and uses_window:
        plan.notes.append(
            f"caveat: Llama has no sliding-window attention; outputs match only for sequences up to {window} tokens"
        )
