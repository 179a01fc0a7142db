"""Decide, from the architecture table and a checkpoint's tensor list, what the weight edit does.

An `EditPlan` maps tensor names to chunk transforms, lists tensors to create (an untied `lm_head`,
explicit zero biases for flags that create a whole group) and the new config. Plans read a
`TensorSource` (names, shapes, dtypes and the small norm weights): the same plan serves safetensors
directories, GGUF files and a model loaded in memory. Nothing is written here.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from refusal_edit.arch import ArchSpec, BiasRoute, TensorMatch, classify, get_spec, spec_for_config, text_config
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
from refusal_edit.edits.spec import WriterBases, full_ablation
from refusal_edit.edits.tensor_source import TensorSource
from refusal_edit.errors import RefusalEditError
from refusal_edit.linalg import sandwich, unit


@dataclass
class NewTensor:
    """A tensor the output gains, placed beside `anchor`: a copy of `source` (or zeros), optionally transformed."""

    name: str
    anchor: str
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


class CheckpointSource:
    """A safetensors checkpoint directory as a `TensorSource` (headers only; norms read on demand)."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self.config = ckpt.config
        self.root: Path | None = ckpt.root

    def infos(self) -> Iterable[TensorInfo]:
        for shard in self.ckpt.shards:
            yield from shard.tensors.values()

    def find(self, name: str) -> TensorInfo | None:
        hit = self.ckpt.find(name)
        return None if hit is None else hit[1]

    def read(self, name: str) -> torch.Tensor:
        hit = self.ckpt.find(name)
        if hit is None:
            raise RefusalEditError(f"missing tensor {name}")
        with TensorReader(hit[0]) as rd:
            return rd.tensor(hit[1]).float()


def as_source(ckpt: Checkpoint | TensorSource) -> TensorSource:
    return CheckpointSource(ckpt) if isinstance(ckpt, Checkpoint) else ckpt


class ConfigView:
    """The text config as config.json states it; a key the file leaves out is answered by transformers'
    resolved config (the class default, e.g. Gemma's `tie_word_embeddings=True`), loaded only then.

    Loading transformers' config machinery takes over a second, most of a small edit's run time, and
    config.json files written by `save_pretrained` state every key.
    """

    def __init__(self, data: dict[str, Any], root: Path | None, aliases: dict[str, str]) -> None:
        self._data, self._root, self._aliases, self._full = data, root, aliases, None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        for key in (self._aliases.get(name, name), name):
            if key in self._data:
                return self._data[key]
        if self._full is None:
            from transformers import AutoConfig

            try:
                if self._root is not None:
                    full = AutoConfig.from_pretrained(str(self._root))
                else:
                    full = AutoConfig.for_model(**self._data)
                self._full = text_config(full)
            except Exception as exc:
                raise RefusalEditError(f"cannot read the model config: {exc}") from exc
        return getattr(self._full, name)


# Keys transformers reads from a multimodal wrapper's own config, not from its text config.
WRAPPER_KEYS = ("tie_word_embeddings",)


def source_spec(source: TensorSource) -> ArchSpec:
    """The table entry of a checkpoint: its top-level model_type (a multimodal wrapper is its own entry)."""
    return spec_for_config(source.config)


def resolved_config(source: TensorSource) -> ConfigView:
    """The text config of the checkpoint (see `ConfigView`); quantized and unsupported models are errors."""
    quant = source.config.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise RefusalEditError(f"quantized checkpoints ({method}) cannot be edited; use the unquantized model")
    spec = source_spec(source)
    text = source.config.get("text_config")
    if spec.text_model_type is not None and isinstance(text, dict):
        wrapper = {k: source.config[k] for k in WRAPPER_KEYS if k in source.config}
        data = {"model_type": spec.text_model_type, **text, **wrapper}
    else:
        data = {**source.config, "model_type": spec.model_type}
    return ConfigView(data, source.root, dict(spec.config_aliases))


def set_config(config: dict[str, Any], key: str, value: Any) -> None:
    """Set a key on the top-level config and, for wrapped models, on the text config too."""
    config[key] = value
    if isinstance(config.get("text_config"), dict):
        config["text_config"][key] = value


def layer_prefix(name: str, spec: ArchSpec, layer: int) -> str:
    m = re.match(rf"(.*?\.)?{re.escape(spec.layers)}\.{layer}\.", name)
    return (m.group(1) or "") if m else ""


Found = list[tuple[TensorMatch, TensorInfo]]


def _matches(source: TensorSource, spec: ArchSpec) -> Found:
    """The writers, all beside the token embedding: the same names inside another module (a multimodal
    wrapper's vision tower or projector) are not the language model's and are left untouched."""
    out = []
    for info in source.infos():
        m = classify(spec, info.name)
        if m is not None:
            out.append((m, info))
    first = next((rule for rule in spec.tensors if rule.site == "embedding"), None)
    scope = next((m.prefix for m, _ in out if m.rule == first), None)
    return out if scope is None else [(m, info) for m, info in out if m.prefix == scope]


def _check_complete(spec: ArchSpec, cfg: Any, found: Found) -> None:
    """Every layer must have its attention and MLP writers (and every expert): never a partial edit."""
    n_layers = int(cfg.num_hidden_layers)
    weights = [m for m, _ in found if m.rule.kind != "bias"]
    if not any(m.rule.site == "embedding" for m in weights):
        raise RefusalEditError(f"checkpoint does not match the {spec.model_type} layout: no embedding found")
    n_experts = spec.num_experts(cfg)
    for layer in range(n_layers):
        here = [m for m in weights if m.layer == layer]
        for site in ("attn", "mlp"):
            if not spec.site(site).optional and not any(m.rule.site == site for m in here):
                raise RefusalEditError(
                    f"checkpoint does not match the {spec.model_type} layout: layer {layer} has no {site} "
                    "output projection"
                )
        experts = [m for m in here if m.rule.per_expert]
        if experts and n_experts and len(experts) != n_experts:
            raise RefusalEditError(
                f"layer {layer} has {len(experts)} expert output projections, the config says {n_experts}"
            )
    if n_layers and any(m.layer is not None and m.layer >= n_layers for m in weights):
        extra = max(m.layer for m in weights if m.layer is not None)  # type: ignore[type-var]
        raise RefusalEditError(f"checkpoint has writers of layer {extra}, the config says {n_layers} layers")


def _check_float(info: TensorInfo) -> None:
    if not info.is_float:
        raise RefusalEditError(f"tensor {info.name} is stored as {info.dtype}: quantized weights cannot be edited")


def post_norm_gain(source: TensorSource, spec: ArchSpec, m: TensorMatch) -> torch.Tensor | None:
    """The gain of the sandwich norms after writer `m` (their product, as each applies it), read from the
    checkpoint (None: no such norm)."""
    if m.layer is None:
        return None
    gain = None
    for norm in spec.post_norm_names(m.layer, m.rule.site, m.rule.module):
        name = layer_prefix(m.name, spec, m.layer) + norm
        if source.find(name) is None:
            raise RefusalEditError(f"missing norm weight {name} (needed for the {spec.model_type} edit)")
        g = source.read(name).float() + spec.norm_offset
        gain = g if gain is None else gain * g
    return gain


def projection(
    match: TensorMatch, info: TensorInfo, basis: torch.Tensor, alpha: float, hidden: int, preserve_norm: bool
) -> ChunkTransform:
    """The chunk transform that removes `alpha` x the span of `basis` from one writer tensor."""
    rule, shape = match.rule, info.shape
    args = (basis, alpha, preserve_norm)
    if rule.residual_last:  # embedding rows, Conv1D [in, H], experts [E, I, H], expert biases [E, H]
        axis_ok, transform = shape[-1] == hidden, ProjectLastDim(*args)
    elif rule.kind == "experts":  # [E, H, I]
        axis_ok, transform = len(shape) == 3 and shape[1] == hidden, ProjectExperts(*args)
    else:  # Linear [H, in], bias [H]
        axis_ok, transform = shape[0] == hidden, ProjectFirstDim(*args)
    if not axis_ok:
        raise RefusalEditError(f"tensor {info.name} has shape {list(shape)}; expected hidden size {hidden}")
    return transform


def _token_embedding(found: Found, spec: ArchSpec) -> TensorInfo:
    """The token embedding: by convention the first embedding rule of the table."""
    first = next(rule for rule in spec.tensors if rule.site == "embedding")
    for m, info in found:
        if m.rule == first:
            return info
    raise RefusalEditError("no token embedding found")


def _untie(plan: EditPlan, source: TensorSource, cfg: Any, found: Found, keep_tied: bool) -> None:
    """Tied head + edited embedding: write the original matrix as the head (exact), unless kept tied."""
    if not getattr(cfg, "tie_word_embeddings", False):
        return
    if keep_tied:
        plan.notes.append(
            "embeddings kept tied: the output head is the edited embedding too (approximate: the final "
            "norm re-introduces an r component, so logits differ from exact ablation)"
        )
        return
    embed = _token_embedding(found, plan.spec)
    head = plan.spec.lm_head
    if source.find(head) is None:
        plan.new.append(NewTensor(head, embed.name, embed.dtype, embed.shape, source=embed.name))
    plan.config = plan.config or copy.deepcopy(source.config)
    set_config(plan.config, "tie_word_embeddings", False)
    plan.notes.append(f"untied embeddings: {head} keeps the original matrix (exact)")


def plan_edit(ckpt: Checkpoint | TensorSource, edit: WriterBases, keep_tied: bool = False) -> EditPlan:
    """Project every residual writer by its site's basis and weight (see `refusal_edit.edits.spec`)."""
    source = as_source(ckpt)
    cfg = resolved_config(source)
    spec = source_spec(source)
    hidden = int(cfg.hidden_size)
    n_layers = int(cfg.num_hidden_layers)
    if edit.n_layers != n_layers:
        raise RefusalEditError(f"the edit is for {edit.n_layers} layers, the model has {n_layers}")
    if edit.bases["embedding", None].shape[-1] != hidden:
        got = edit.bases["embedding", None].shape[-1]
        raise RefusalEditError(f"direction has size {got}, the model's hidden size is {hidden}")
    found = _matches(source, spec)
    _check_complete(spec, cfg, found)
    plan = EditPlan("ablate", spec, notes=list(dict.fromkeys(edit.notes)))
    gains: dict[tuple[int | None, str, str | None], torch.Tensor | None] = {}
    unchanged = 0
    for m, info in found:
        _check_float(info)
        basis, alpha = edit.at(m.rule.site, m.layer)
        key = (m.layer, m.rule.site, m.rule.module)
        if key not in gains:
            gains[key] = post_norm_gain(source, spec, m)
        basis = sandwich(basis, gains[key])
        if alpha == 0 or basis.shape[0] == 0:
            unchanged += 1
            continue
        plan.transforms[m.name] = projection(m, info, basis, alpha, hidden, edit.preserve_norm)
        plan.count(m.rule.kind)
    if unchanged:
        plan.notes.append(f"{unchanged} writer tensors left unchanged (weight 0, or a norm gain that removes r)")
    if edit.alphas["embedding", None] != 0:
        _untie(plan, source, cfg, found, keep_tied)
    if spec.sandwich:
        plan.notes.append(spec.notes)
    return require_change(plan)


def require_change(plan: EditPlan) -> EditPlan:
    """The plan, if it changes at least one tensor: an edit that changes nothing would write a copy of the
    model labelled as edited."""
    if not plan.transforms and not plan.new:
        raise RefusalEditError(
            "this edit changes no tensor (every selected writer has weight 0, or none is selected): "
            "nothing would be edited"
        )
    return plan


def plan_ablation(ckpt: Checkpoint | TensorSource, direction: torch.Tensor, keep_tied: bool = False) -> EditPlan:
    """Orthogonalize every residual writer against the direction (the paper's edit)."""
    source = as_source(ckpt)
    n_layers = int(resolved_config(source).num_hidden_layers)
    return plan_edit(source, full_ablation(unit(direction), n_layers), keep_tied=keep_tied)


def _choose_route(spec: ArchSpec, cfg: Any, site: str) -> BiasRoute | None:
    routes = [r for r in spec.bias_routes if r.site == site]
    for route in routes:  # prefer a route whose biases already exist: no config change
        if route.relabel is None and (route.flag is None or getattr(cfg, route.flag, False)):
            return route
    return routes[0] if routes else None


def _route_error(spec: ArchSpec, layer: int, site: str, why: str | None = None) -> RefusalEditError:
    other = sorted({r.site for r in spec.bias_routes} - {site})
    if why is None and site == "input" and spec.sandwich:
        why = "a norm sits between its projections and the residual add"
    if why is None and spec.derived:  # which flag creates a bias transformers loads back is no derivable fact
        why = "its residual writers are derived, and which config flag creates a bias is known only to the table"
    why = why or f"no stock bias writes at the {site} site"
    alternatives = ["`layer` 0 (baked into the embedding)"] if site == "input" else []
    alternatives += [f"`site` {o}" for o in other]
    alternatives.append("the run-time hook (evaluate `mode` add)")
    return RefusalEditError(
        f"cannot bake an addition at layer {layer} ({site} site) into {spec.model_type} with stock transformers "
        f"({why}); alternatives: {', '.join(alternatives)}"
    )


def _fill_group(plan: EditPlan, source: TensorSource, spec: ArchSpec, prefix: str, n_layers: int, route: BiasRoute):
    """A flag creates every bias of its group in every layer: write explicit zeros for the missing ones.
    Hybrid layers have only some of the group's modules (no attention in a linear-attention layer): a
    module a layer lacks has no bias to create."""
    for lyr in range(n_layers):
        for module in route.group:
            bias = f"{prefix}{spec.layers}.{lyr}.{module}.bias"
            if source.find(bias) is not None or any(t.name == bias for t in plan.new):
                continue
            weight = source.find(f"{prefix}{spec.layers}.{lyr}.{module}.weight")
            if weight is None:
                continue
            plan.new.append(NewTensor(bias, weight.name, weight.dtype, (weight.shape[0],)))
            plan.count("zero bias")


def plan_addition(
    ckpt: Checkpoint | TensorSource, vector: torch.Tensor, layer: int, site: str = "input", keep_tied: bool = False
) -> EditPlan:
    """Bake `vector` as a constant added to the residual stream at `site` of `layer`.

    site "input": at the input of `layer` (layer 0: every embedding row; else the MLP-output bias of
    layer - 1). site "attn": after the attention of `layer` (its output-projection bias).
    """
    source = as_source(ckpt)
    cfg = resolved_config(source)
    spec = source_spec(source)
    hidden = int(cfg.hidden_size)
    n_layers = int(cfg.num_hidden_layers)
    v = vector.detach().float()
    if v.numel() != hidden:
        raise RefusalEditError(f"vector has size {v.numel()}, the model's hidden size is {hidden}")
    if not torch.isfinite(v).all():
        raise RefusalEditError("the vector to add contains NaN or infinite values")
    if not v.any():
        raise RefusalEditError("the vector to add is zero (`coeff` 0?): this edit changes no tensor")
    if not 0 <= layer < n_layers:
        raise RefusalEditError(
            f"`layer` {layer} is out of range: the model has {n_layers} layers (0 to {n_layers - 1})"
        )
    if site not in ("input", "attn"):
        raise RefusalEditError(f"unknown site {site!r} (input, attn)")
    found = _matches(source, spec)
    _check_complete(spec, cfg, found)
    plan = EditPlan("add", spec)
    if layer == 0 and site == "input":
        embed = _token_embedding(found, spec)
        _check_float(embed)
        plan.transforms[embed.name] = AddLastDim(v / spec.embed_scale(cfg))
        plan.count("embedding")
        plan.notes.append("layer 0: the vector is added to every embedding row")
        _untie(plan, source, cfg, found, keep_tied)
        return plan
    route = _choose_route(spec, cfg, site)
    if route is None:
        raise _route_error(spec, layer, site)
    writer_layer = layer - 1 if site == "input" else layer
    anchor = next(m.name for m, _ in found if m.layer == writer_layer)
    prefix = layer_prefix(anchor, spec, writer_layer)
    target = f"{prefix}{spec.layers}.{writer_layer}.{route.target}.bias"
    if source.find(f"{prefix}{spec.layers}.{writer_layer}.{route.target}.weight") is None:
        raise _route_error(spec, layer, site, f"layer {writer_layer} has no {route.target} (a hybrid layer)")
    add = AddFirstDim(v / spec.residual_scale(cfg))
    if route.relabel:
        _relabel(plan, source, cfg, route.relabel)
        # The relabelled architecture keeps the biases that already exist only if their flags are on.
        for other in get_spec(route.relabel).bias_routes:
            if other.flag and any(source.find(f"{prefix}{spec.layers}.0.{m}.bias") for m in other.group):
                set_config(plan.config, other.flag, True)  # type: ignore[arg-type]
                _fill_group(plan, source, spec, prefix, n_layers, other)
    if route.flag is not None and not getattr(cfg, route.flag, False):
        plan.config = plan.config or copy.deepcopy(source.config)
        set_config(plan.config, route.flag, True)
        plan.notes.append(f"config: {route.flag}=true (the other biases it creates are written as zeros)")
    _fill_group(plan, source, spec, prefix, n_layers, route)
    new_target = next((t for t in plan.new if t.name == target), None)
    if new_target is not None:
        new_target.transform = add
    elif source.find(target) is not None:
        plan.transforms[target] = add
    else:
        raise RefusalEditError(f"{target} does not exist and no config flag creates it")
    plan.count("bias")
    where = f"input of layer {layer}" if site == "input" else f"output of layer {layer}'s attention"
    plan.notes.append(f"the vector is added at the {where} via {route.target}.bias of layer {writer_layer}")
    return plan


def _relabel(plan: EditPlan, source: TensorSource, cfg: Any, target: str) -> None:
    """Express the model as another stock architecture of the table that computes the same function."""
    plan.config = plan.config or copy.deepcopy(source.config)
    original = plan.config.get("model_type")
    plan.config["model_type"] = target
    plan.config["architectures"] = [get_spec(target).stock_class]
    plan.notes.append(f"config: {original} relabelled as {plan.config['architectures'][0]} (identical computation)")
    window = getattr(cfg, "sliding_window", None)
    uses_window = getattr(cfg, "use_sliding_window", window is not None)
    if window and uses_window:
        plan.notes.append(
            f"caveat: Llama has no sliding-window attention; outputs match only for sequences up to {window} tokens"
        )
