"""Derive an `ArchSpec` from a tiny instance of the model: writers, sites, norm chains, scales, tensor names.

Steps (each numeric, none from module or class names):
1. record one forward pass (`probe`); the residual stream must pass unchanged from layer to layer;
2. account for each layer's delta (`account`): the writer modules, their post-norm chains and gains;
3. order the layer's top-level terms by data dependence: terms nothing else in the layer reads come first
   (attention), the rest is the `mlp` site (a layer with a single term writes at `mlp`);
4. find each writer's parameters and residual axis (`params`), the embeddings (what the first layer's input
   is made of) and their scale, the final norm (what reads the last layer's output);
5. save the tiny model and match every writer parameter to the checkpoint tensors that hold it (same name,
   renamed, one tensor per expert, or transposed), so that the rules name both.
"""

from __future__ import annotations

import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from refusal_edit.arch import ArchSpec, Site, TensorKind, TensorRule, WriterSite
from refusal_edit.derive.account import Term, account_layer, constant_coefficients, smallest_set
from refusal_edit.derive.params import WriterParam, writer_params
from refusal_edit.derive.probe import Recording, record, run, token_ids
from refusal_edit.derive.scales import match_scale, scale_function
from refusal_edit.derive.shrink import EXPERTS, _signature, layer_list, tiny_model
from refusal_edit.errors import RefusalEditError


@dataclass
class Derived:
    spec: ArchSpec
    model: nn.Module  # the tiny instance the spec was derived on (verified next)
    ids: torch.Tensor


def _kind(p: WriterParam, name: str, embedding: bool = False) -> TensorKind:
    if p.ndim == 1:
        return "bias"
    if p.ndim == 2:
        if p.axis == 0:
            return "linear"
        return "embedding" if embedding else ("experts_bias" if name.endswith("bias") else "conv1d")
    if p.ndim == 3:
        return "experts" if p.axis == 1 else "experts_t"
    raise RefusalEditError(f"parameter {name} has {p.ndim} dimensions: no edit layout for it")


def _levels(model: nn.Module, layer: nn.Module, tops: list[str], ids: torch.Tensor) -> dict[str, int]:
    """Dependence level of each top-level term: 0 if no other term of the layer feeds it."""
    base: dict[str, torch.Tensor] = {}
    feeds: dict[str, set[str]] = {t: set() for t in tops}

    def capture(store: dict[str, torch.Tensor], name: str):
        def hook(_m: nn.Module, _a: Any, out: Any) -> None:
            t = out[0] if isinstance(out, tuple) else out
            store.setdefault(name, t.detach().clone())

        return hook

    for noisy in [None, *tops]:
        seen: dict[str, torch.Tensor] = {}
        handles = [layer.get_submodule(t).register_forward_hook(capture(seen, t)) for t in tops]
        if noisy is not None:

            def noise(_m: nn.Module, _a: Any, out: Any) -> Any:
                t = out[0] if isinstance(out, tuple) else out
                t = t + torch.randn_like(t)
                return (t, *out[1:]) if isinstance(out, tuple) else t

            handles.insert(0, layer.get_submodule(noisy).register_forward_hook(noise))
        try:
            run(model, ids)
        finally:
            for h in handles:
                h.remove()
        if noisy is None:
            base = seen
            continue
        for t in tops:
            if t != noisy and t in seen and not torch.allclose(seen[t], base[t], rtol=1e-6, atol=1e-7):
                feeds[t].add(noisy)
    levels: dict[str, int] = {}

    def level(t: str, stack: frozenset[str] = frozenset()) -> int:
        if t not in levels:
            levels[t] = 0 if not feeds[t] else 1 + max(level(u, stack | {t}) for u in feeds[t] if u not in stack)
        return levels[t]

    for t in tops:
        level(t)
    return levels


def _sites(tops: list[str], levels: dict[str, int]) -> dict[str, Site]:
    if max(levels.values()) == 0:
        return {t: ("mlp" if i == len(tops) - 1 else "attn") for i, t in enumerate(tops)}
    return {t: ("attn" if levels[t] == 0 else "mlp") for t in tops}


def _check_boundaries(rec: Recording) -> None:
    for i in range(len(rec.layer_in) - 1):
        if not torch.allclose(rec.layer_out[i], rec.layer_in[i + 1], rtol=1e-6, atol=1e-7):
            raise RefusalEditError(
                f"the residual stream changes between layers {i} and {i + 1} outside the layers: no exact edit"
            )


def _disk_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        out = {}
        for shard in sorted(Path(tmp).glob("*.safetensors")):
            with safe_open(str(shard), "pt") as fh:
                out |= {k: fh.get_tensor(k) for k in fh.keys()}
    return out


def _generalize(rel: str, index: int | None = None) -> str:
    """A layer-relative name as a pattern; `index`: the component that is the expert number."""
    parts = rel.split(".")
    out = [r"\d+" if index is not None and i == index else re.escape(p) for i, p in enumerate(parts)]
    return r"\.".join(out)


def _layer_rel(name: str, layers: str, layer: int) -> str | None:
    m = re.search(rf"(?:^|\.){re.escape(layers)}\.{layer}\.(.+)$", name)
    return m.group(1) if m else None


def _disk_rules(
    mem: torch.Tensor,
    kind: TensorKind,
    p: WriterParam,
    site: Site,
    module: str,
    layers: str,
    layer: int,
    disk: dict[str, torch.Tensor],
) -> list[TensorRule]:
    """Rules for the checkpoint tensors that hold the in-memory writer parameter `mem` of `layer`."""
    prefix = rf"{re.escape(layers)}\.(?P<layer>\d+)\."
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for name, t in disk.items():
        if _layer_rel(name, layers, layer) is not None:
            by_shape.setdefault(tuple(t.shape), []).append(name)

    def equal(name: str, value: torch.Tensor) -> bool:
        return disk[name].dtype == value.dtype and torch.equal(disk[name], value)

    for name in by_shape.get(tuple(mem.shape), []):
        if equal(name, mem):
            return [TensorRule(prefix + _generalize(_layer_rel(name, layers, layer)), kind, site, module=module)]
    if mem.dim() == 3 and kind in ("experts", "experts_t"):
        flipped: TensorKind = "experts_t" if kind == "experts" else "experts"
        for name in by_shape.get(tuple(mem.transpose(1, 2).shape), []):
            if equal(name, mem.transpose(1, 2).contiguous()):
                rel = _generalize(_layer_rel(name, layers, layer))
                return [TensorRule(prefix + rel, flipped, site, module=module)]
    if mem.dim() in (2, 3) and kind in ("experts", "experts_t", "experts_bias"):
        for transpose in (False, True):
            names = []
            for e in range(mem.shape[0]):
                value = mem[e].T.contiguous() if transpose and mem.dim() == 3 else mem[e].contiguous()
                hit = next((n for n in by_shape.get(tuple(value.shape), []) if equal(n, value)), None)
                if hit is None:
                    break
                names.append(_layer_rel(hit, layers, layer))
            else:
                parts = [n.split(".") for n in names]
                index = next(
                    (i for i in range(len(parts[0])) if [p[i] for p in parts] == [str(e) for e in range(len(parts))]),
                    None,
                )
                if index is None:
                    continue
                axis_first = (kind == "experts") != transpose
                one: TensorKind = "bias" if mem.dim() == 2 else ("linear" if axis_first else "conv1d")
                return [TensorRule(prefix + _generalize(names[0], index), one, site, True, module)]
    return []


def _bias_rules(module: nn.Module, p: WriterParam, *rules_: Any) -> list[TensorRule]:
    """The bias of a Linear writer, whether or not this config has one (another config of the same type may:
    `attention_bias`), so that a cached spec never misses it."""
    owner = module.get_submodule(p.name.rsplit(".", 1)[0]) if "." in p.name else module
    if not (isinstance(owner, nn.Linear) and p.name.endswith("weight") and p.axis == 0):
        return []
    memory, found = rules_
    out = []
    for rule in (memory, *found):
        if rule.pattern.endswith(r"\.weight") and rule.kind == "linear":
            out.append(
                TensorRule(rule.pattern[: -len("weight")] + "bias", "bias", rule.site, rule.per_expert, rule.module)
            )
    return out


def _embedding_calls(rec: Recording, target: torch.Tensor, before: int) -> list[Any]:
    """The sibling modules whose outputs make up `target` (the first layer's input), called before `before`;
    a parameterless step (dropout, a scale) is followed to its own input."""
    from refusal_edit.derive.account import norm_offset

    cands = [c for c in rec.siblings.values() if c.order < before and c.out is not None]
    parts = smallest_set(target, cands, [])
    if parts is None:
        raise RefusalEditError("the first layer's input is not made of embedding outputs")
    out = []
    for call in parts:
        offset = norm_offset(call)
        if offset is not None and offset != offset and call.inp is not None:  # transparent: follow its input
            out += _embedding_calls(rec, call.inp, call.order)
        elif offset is not None:
            raise RefusalEditError(f"a norm ({call.name}) follows the embeddings: no exact embedding edit")
        else:
            out.append(call)
    return out


def _stock_class(config: Any) -> tuple[str, str | None]:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    model_type = config.model_type
    cls = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type) or MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(
        model_type
    )
    if cls is None:
        raise RefusalEditError(f"{model_type!r} has no causal-LM or image-text-to-text class in transformers")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    text_type = text.model_type if text is not config and text.model_type != model_type else None
    return cls, text_type


def derive(config: Any) -> Derived:
    """Derive the spec of `config`'s model type on a tiny instance (not yet verified: see `verify`)."""
    stock_class, text_type = _stock_class(config)
    model = tiny_model(config)
    cfg = model.config
    n = int(cfg.num_hidden_layers)
    layers_name, layers = layer_list(model, n)
    layers_attr = layers_name.rsplit(".", 1)[-1]
    ids = token_ids(int(cfg.vocab_size))
    rec = record(model, layers_name, ids)
    hidden = rec.hidden_shape[-1]
    _check_boundaries(rec)

    # 2. what each layer adds; the full search once per layer structure
    signatures = [_signature(layer) for layer in layers]
    tops_of: dict[tuple, list[str]] = {}
    site_of: dict[str, Site] = {}
    chain_of: dict[str, tuple[str, ...]] = {}
    offsets: dict[str, float] = {}
    first_layer: dict[str, int] = {}
    probe_at: dict[tuple[tuple, str], int] = {}  # one layer of each structure per module: dense and MoE `mlp`s
    layer_sites: list[set[Site]] = []
    for i in range(n):
        acc = account_layer(i, rec.calls[i], rec.layer_in[i], rec.layer_out[i], tops_of.get(signatures[i]))
        if signatures[i] not in tops_of:
            tops_of[signatures[i]] = acc.tops
            levels = _levels(model, layers[i], acc.tops, ids)
            sites = _sites(acc.tops, levels)
        else:
            sites = {t: site_of[next(x.module for x in acc.terms if x.top == t)] for t in acc.tops}
        here: set[Site] = set()
        for term in acc.terms:
            site = sites[term.top]
            for what, table, value in (("site", site_of, site), ("norms", chain_of, term.chain)):
                if table.setdefault(term.module, value) != value:
                    raise RefusalEditError(f"module {term.module} has a different {what} in different layers")
            first_layer.setdefault(term.module, i)
            probe_at.setdefault((signatures[i], term.module), i)
            here.add(site)
        for norm, off in acc.offsets.items():
            offsets[norm] = off
        layer_sites.append(here)
    if len(set(offsets.values())) > 1:
        raise RefusalEditError(f"post-norms apply different gains ({sorted(set(offsets.values()))}): not supported")
    norm_offset = next(iter(offsets.values()), 0.0)

    # 4. writer parameters of each module, on the first layer that has it
    disk = _disk_tensors(model)
    rules: list[TensorRule] = []
    for (_, module), layer in probe_at.items():
        call = rec.calls[layer][module]
        for p in writer_params(call, hidden, rec.hidden_shape):
            full = f"{layers_name}.{layer}.{module}.{p.name}"
            kind = _kind(p, full)
            rel = f"{module}.{p.name}"
            memory = TensorRule(
                rf"{re.escape(layers_attr)}\.(?P<layer>\d+)\.{_generalize(rel)}", kind, site_of[module], module=module
            )
            found = _disk_rules(
                model.get_parameter(full).detach(), kind, p, site_of[module], module, layers_attr, layer, disk
            )
            if not found:
                raise RefusalEditError(f"cannot find the checkpoint tensor that holds {full}")
            for rule in (memory, *found, *_bias_rules(call.module, p, memory, found)):
                if rule.pattern not in {x.pattern for x in rules}:
                    rules.append(rule)

    # embeddings: what layer 0's input is made of (through parameterless steps such as dropout)
    vocab = int(cfg.vocab_size)
    parts = _embedding_calls(rec, rec.layer_in[0], rec.layer_order[0])
    embed_rules: list[TensorRule] = []
    names: list[str] = []

    def token_first(c: Any) -> tuple:
        weight = getattr(c.module, "weight", None)
        return (not (isinstance(weight, torch.Tensor) and weight.shape[0] == vocab), c.order)

    token_first_calls = sorted(parts, key=token_first)
    for call in token_first_calls:
        for p in writer_params(call, hidden, rec.hidden_shape):
            if p.ndim != 2 or p.axis != 1:
                raise RefusalEditError(f"embedding {call.name}.{p.name} does not hold one row per token")
            embed_rules.append(TensorRule(_generalize(f"{call.name}.{p.name}"), "embedding", "embedding"))
        names.append(call.name)
    token_first = token_first_calls  # type: ignore[assignment]
    embed_scale = "one"
    token = token_first[0]
    coeffs = constant_coefficients(rec.layer_in[0], [c.out for c in token_first])
    weight = getattr(token.module, "weight", None)
    if coeffs is not None and isinstance(weight, torch.Tensor) and weight.shape[0] == vocab:
        rows_ = weight.detach().double()[ids.reshape(-1)]
        inner = float((token.out * rows_).sum() / rows_.square().sum())
        embed_scale = match_scale(coeffs[0] * inner, cfg)
    else:
        embed_scale = "unknown"

    final = next(
        (
            c.name
            for c in rec.siblings.values()
            if c.inp is not None
            and c.order > rec.layer_order[-1]
            and c.inp.shape == rec.layer_out[-1].shape
            and torch.allclose(c.inp, rec.layer_out[-1], rtol=1e-6, atol=1e-7)
        ),
        None,
    )
    if final is None:
        raise RefusalEditError("no final norm reads the last layer's output")

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_name = next(
        (f"{n}.weight" for n, m in model.named_modules() if head is not None and m is head), "lm_head.weight"
    )

    sites = []
    for site in ("attn", "mlp"):
        modules = tuple(m for m in first_layer if site_of[m] == site)
        optional = any(site not in here for here in layer_sites)
        chains = tuple((m, chain_of[m]) for m in modules)
        sites.append(WriterSite(site, modules, None, chains, optional))  # type: ignore[arg-type]
    per_expert = any(r.per_expert for r in rules)
    experts_attrs = tuple(
        k for k, v in sorted(cfg.to_dict().items()) if per_expert and v == EXPERTS and not isinstance(v, bool)
    )
    spec = ArchSpec(
        config.model_type,
        (*embed_rules, *rules),
        stock_class,
        layers=layers_attr,
        sites=tuple(sites),
        embeddings=tuple(names),
        final_norm=final,
        lm_head=head_name if text_type is None else "lm_head.weight",
        norm_offset=norm_offset,
        embed_scale=_scale_fn(embed_scale),
        experts_attrs=experts_attrs,
        text_model_type=text_type,
        recurrent=True,
        notes=f"derived from the model and verified; embedding scale: {embed_scale}",
        derived=True,
    )
    return Derived(spec, model, ids)


def _scale_fn(formula: str):

    return scale_function(formula)


__all__ = ["Derived", "Term", "derive", "math"]
