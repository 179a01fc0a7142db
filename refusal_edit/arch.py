"""Where each supported architecture writes into the residual stream: the one table of architecture facts.

Everything that depends on a `model_type` (which tensors to orthogonalize, which modules to hook, which
norm sits between a projection and the residual add, how a constant bias can be baked with stock config
flags) is read from `ARCHITECTURES`. No other module branches on architecture names.

Tensor names are matched by *suffix* (regex anchored at a name boundary) so that wrappers that prefix
names (`language_model.`, `model.`) still match.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from refusal_edit.errors import RefusalEditError

TensorKind = Literal["embedding", "linear", "conv1d", "bias", "experts"]
Site = Literal["embedding", "attn", "mlp"]


@dataclass(frozen=True)
class TensorRule:
    """A family of checkpoint tensors that write into the residual stream.

    `kind` says which axis is the residual one: `embedding` rows ([V, H]), `linear` rows ([H, in]),
    `conv1d` columns ([in, H], GPT-2), `bias` ([H]), `experts` fused per-expert linears ([E, H, I]).
    `site` picks the post-projection norm on sandwich-norm architectures.
    """

    pattern: str
    kind: TensorKind
    site: Site
    per_expert: bool = False  # one tensor per routed expert: their count must match the config

    def match(self, name: str) -> re.Match[str] | None:
        return re.search(r"(?:^|\.)" + self.pattern + "$", name)


@dataclass(frozen=True)
class BiasRoute:
    """How a constant added to the residual stream is baked into a bias with stock config flags.

    `site="input"`: the bias of the last writer of layer L-1 (the MLP output) adds the vector at the
    input of layer L, exactly what the run-time hook at layer L does. `site="attn"`: the bias of layer
    L's attention output adds it after the attention of layer L (before its MLP).
    `flag` is the config flag that makes transformers create the biases of `group` (module suffixes
    inside a layer); missing ones are written as explicit zeros. `None` means the bias always exists.
    `target` is the module whose bias receives the vector. `relabel` rewrites the config as another
    stock architecture that has the flag (Qwen2 / Mistral -> Llama).
    """

    flag: str | None
    target: str
    group: tuple[str, ...] = ()
    site: Literal["input", "attn"] = "input"
    relabel: str | None = None


def _one(_: Any) -> float:
    return 1.0


def _sqrt_hidden(cfg: Any) -> float:
    return float(cfg.hidden_size) ** 0.5


def _embedding_multiplier(cfg: Any) -> float:
    return float(getattr(cfg, "embedding_multiplier", 1.0))


def _residual_multiplier(cfg: Any) -> float:
    return float(getattr(cfg, "residual_multiplier", 1.0))


@dataclass(frozen=True)
class ArchSpec:
    """Residual-stream facts of one `model_type` (see module docstring)."""

    model_type: str
    tensors: tuple[TensorRule, ...]
    layers: str = "layers"  # name of the decoder-layer list (module and tensor names)
    attn: str = "self_attn"  # layer child whose output is the attention write
    mlp: str = "mlp"  # layer child whose output is the MLP write (dense or MoE block)
    embeddings: tuple[str, ...] = ("embed_tokens",)  # siblings of the layer list that write
    final_norm: str = "norm"
    lm_head: str = "lm_head.weight"
    # Sandwich norms: (attention norm, MLP norm) between projection and residual add, gain = offset + w.
    post_norms: tuple[str, str] | None = None
    norm_offset: float = 0.0
    embed_scale: Callable[[Any], float] = _one  # embedding output = scale * E[token]
    residual_scale: Callable[[Any], float] = _one  # writer output is multiplied by this before the add
    bias_routes: tuple[BiasRoute, ...] = ()
    experts_attrs: tuple[str, ...] = ()  # config attributes holding the number of routed experts
    config_aliases: tuple[tuple[str, str], ...] = ()  # (standard name, this model's config.json key)
    notes: str = ""

    def post_norm_name(self, layer: int, site: Site) -> str | None:
        """Suffix name of the norm weight that follows the `site` writer of `layer`, if any."""
        if self.post_norms is None or site == "embedding":
            return None
        norm = self.post_norms[0] if site == "attn" else self.post_norms[1]
        return f"{self.layers}.{layer}.{norm}.weight"

    def num_experts(self, cfg: Any) -> int | None:
        for attr in self.experts_attrs:
            value = getattr(cfg, attr, None)
            if value:
                return int(value)
        return None


def _writer_rules(
    embeddings: tuple[str, ...], attn: str, mlp: str, layers: str = "layers", kind: TensorKind = "linear"
) -> tuple[TensorRule, ...]:
    """Embeddings, then each layer's attention and MLP output projections with their biases."""
    rules = [TensorRule(rf"{re.escape(e)}\.weight", "embedding", "embedding") for e in embeddings]
    for site, module in (("attn", attn), ("mlp", mlp)):
        prefix = rf"{layers}\.(?P<layer>\d+)\.{re.escape(module)}"
        rules += [TensorRule(rf"{prefix}\.weight", kind, site), TensorRule(rf"{prefix}\.bias", "bias", site)]  # type: ignore[arg-type]
    return tuple(rules)


def _llama_like() -> tuple[TensorRule, ...]:
    return _writer_rules(("embed_tokens",), "self_attn.o_proj", "mlp.down_proj")


_MOE_QWEN = (
    TensorRule(r"layers\.(?P<layer>\d+)\.mlp\.experts\.\d+\.down_proj\.weight", "linear", "mlp", True),
    TensorRule(r"layers\.(?P<layer>\d+)\.mlp\.experts\.down_proj", "experts", "mlp"),
    TensorRule(r"layers\.(?P<layer>\d+)\.mlp\.shared_expert\.down_proj\.weight", "linear", "mlp"),
)

_ATTN_GROUP = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_MLP_GROUP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_ATTN_ROUTE = BiasRoute("attention_bias", "self_attn.o_proj", _ATTN_GROUP, "attn")
_MLP_ROUTE = BiasRoute("mlp_bias", "mlp.down_proj", _MLP_GROUP, "input")
# Qwen2 / Mistral have no bias flags of their own; LlamaForCausalLM computes the same function and has both.
_TO_LLAMA = (
    BiasRoute("mlp_bias", "mlp.down_proj", _MLP_GROUP, "input", relabel="llama"),
    BiasRoute("attention_bias", "self_attn.o_proj", _ATTN_GROUP, "attn", relabel="llama"),
)

_SPECS = (
    ArchSpec("llama", _llama_like(), bias_routes=(_MLP_ROUTE, _ATTN_ROUTE)),
    ArchSpec("mistral", _llama_like(), bias_routes=_TO_LLAMA),
    ArchSpec("qwen2", _llama_like(), bias_routes=_TO_LLAMA),
    ArchSpec("qwen3", _llama_like(), bias_routes=(_ATTN_ROUTE,)),
    ArchSpec("gemma", _llama_like(), embed_scale=_sqrt_hidden, bias_routes=(_ATTN_ROUTE,)),
    ArchSpec(
        "gemma2",
        _llama_like(),
        post_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
        norm_offset=1.0,
        embed_scale=_sqrt_hidden,
        notes="sandwich norms: writers are orthogonalized against normalize((1 + w) * r)",
    ),
    ArchSpec(
        "gemma3_text",
        _llama_like(),
        post_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
        norm_offset=1.0,
        embed_scale=_sqrt_hidden,
        notes="sandwich norms: writers are orthogonalized against normalize((1 + w) * r)",
    ),
    ArchSpec("phi3", _llama_like()),
    ArchSpec(
        "gpt2",
        _writer_rules(("wte", "wpe"), "attn.c_proj", "mlp.c_proj", layers="h", kind="conv1d"),
        layers="h",
        attn="attn",
        embeddings=("wte", "wpe"),
        config_aliases=(("hidden_size", "n_embd"), ("num_hidden_layers", "n_layer")),
        final_norm="ln_f",
        bias_routes=(BiasRoute(None, "mlp.c_proj", site="input"), BiasRoute(None, "attn.c_proj", site="attn")),
    ),
    ArchSpec(
        "gpt_neox",
        _writer_rules(("embed_in",), "attention.dense", "mlp.dense_4h_to_h"),
        attn="attention",
        embeddings=("embed_in",),
        final_norm="final_layer_norm",
        lm_head="embed_out.weight",
        bias_routes=(
            BiasRoute(None, "mlp.dense_4h_to_h", site="input"),
            BiasRoute("attention_bias", "attention.dense", ("attention.query_key_value", "attention.dense"), "attn"),
        ),
        notes="parallel residual: attention and MLP both write and are both edited",
    ),
    ArchSpec(
        "olmo2",
        _llama_like(),
        post_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
        norm_offset=0.0,
        notes="sandwich norms: writers are orthogonalized against normalize(w * r)",
    ),
    ArchSpec(
        "granite",
        _llama_like(),
        embed_scale=_embedding_multiplier,
        residual_scale=_residual_multiplier,
        bias_routes=(_MLP_ROUTE, _ATTN_ROUTE),
    ),
    ArchSpec(
        "mixtral",
        (
            *_llama_like(),
            TensorRule(r"layers\.(?P<layer>\d+)\.block_sparse_moe\.experts\.\d+\.w2\.weight", "linear", "mlp", True),
            TensorRule(r"layers\.(?P<layer>\d+)\.mlp\.experts\.down_proj", "experts", "mlp"),
        ),
        experts_attrs=("num_local_experts",),
    ),
    ArchSpec("qwen2_moe", (*_llama_like(), *_MOE_QWEN), experts_attrs=("num_experts",)),
    ArchSpec("qwen3_moe", (*_llama_like(), *_MOE_QWEN), bias_routes=(_ATTN_ROUTE,), experts_attrs=("num_experts",)),
)

ARCHITECTURES: dict[str, ArchSpec] = {spec.model_type: spec for spec in _SPECS}


def supported() -> list[str]:
    return sorted(ARCHITECTURES)


def get_spec(model_type: str | None) -> ArchSpec:
    """The spec for `model_type`, or a clear error listing what is supported (never a partial edit)."""
    spec = ARCHITECTURES.get(model_type or "")
    if spec is None:
        raise RefusalEditError(
            f"unsupported architecture {model_type!r}; supported model types: {', '.join(supported())}"
        )
    return spec


def text_config(config: Any) -> Any:
    """The language-model part of a (possibly multimodal) config."""
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


@dataclass
class TensorMatch:
    """One checkpoint tensor that the table says writes into the residual stream."""

    name: str
    rule: TensorRule
    layer: int | None = field(default=None)


def classify(spec: ArchSpec, name: str) -> TensorMatch | None:
    """Which residual-writer rule `name` falls under, if any."""
    for rule in spec.tensors:
        m = rule.match(name)
        if m:
            layer = m.groupdict().get("layer")
            return TensorMatch(name, rule, int(layer) if layer is not None else None)
    return None
