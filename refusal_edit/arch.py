"""Where each supported architecture writes into the residual stream: the one table of architecture facts.

Everything that depends on a `model_type` (which tensors to orthogonalize, which modules to hook, which
norm sits between a projection and the residual add, how a constant bias can be baked with stock config
flags) is read from `ARCHITECTURES`. No other module branches on architecture names.

A decoder layer writes into the residual stream at *sites* (`attn`, then `mlp`). A site lists the layer
children whose outputs are added there: a plain transformer has one per site, a hybrid has alternatives
that differ by layer type (full or linear attention, convolution), a parallel mixer has several at once;
whichever of them a layer has are hooked. Tensor names are matched by *suffix* (regex anchored at a name
boundary) so that wrappers that prefix names (`language_model.`, `model.`) still match.

Multimodal wrappers (Gemma 3, Mistral 3) are entries of their own, keyed by the top-level `model_type`:
the language model inside is edited like its text-only twin, the vision tower and projector are left
as they are, and the wrapper's stock class loads the result.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from refusal_edit.errors import RefusalEditError

TensorKind = Literal["embedding", "linear", "conv1d", "bias", "experts", "experts_t", "experts_bias"]
RESIDUAL_LAST: frozenset[str] = frozenset({"embedding", "conv1d", "experts_t", "experts_bias"})
Site = Literal["embedding", "attn", "mlp"]
LAYER_SITES: tuple[Site, ...] = ("attn", "mlp")


@dataclass(frozen=True)
class TensorRule:
    """A family of checkpoint tensors that write into the residual stream.

    `kind` says which axis is the residual one: `embedding` rows ([V, H]), `linear` rows ([H, in]),
    `conv1d` columns ([in, H], GPT-2), `bias` ([H]), `experts` fused per-expert linears [E, H, I],
    `experts_t` fused experts stored input-major [E, I, H] (gpt-oss, Llama 4: `x @ W`), `experts_bias`
    per-expert output biases [E, H]. The layout is stated, never guessed from shapes: gpt-oss has
    I = H. `site` picks the post-projection norm on sandwich-norm architectures and groups the writers
    of one layer.
    """

    pattern: str
    kind: TensorKind
    site: Site
    per_expert: bool = False  # one tensor per routed expert: their count must match the config
    module: str | None = None  # the layer child it belongs to, where the site's norms differ by module

    def match(self, name: str) -> re.Match[str] | None:
        return re.search(r"(?:^|\.)" + self.pattern + "$", name)

    @property
    def residual_last(self) -> bool:
        """The residual stream is the last axis (every row a written vector), not the first."""
        return self.kind in RESIDUAL_LAST

    @property
    def label(self) -> str:
        """A readable name for tables: the pattern without regex syntax (`layers.N.self_attn.o_proj.weight`)."""
        text = self.pattern.replace(r"(?P<layer>\d+)", "N").replace(r"\d+", "E").replace("\\", "")
        return text


@dataclass(frozen=True)
class WriterSite:
    """Where a decoder layer adds to the residual stream, and which of its children write there.

    `modules`: child names of a decoder layer (dotted paths allowed); every one a layer has is a writer at
    this site (hybrid layers have one of several, parallel mixers several). `post_norm`: the norm between
    those outputs and the residual add (sandwich norms), whose gain changes the direction to remove.
    """

    name: Site
    modules: tuple[str, ...]
    post_norm: str | None = None
    # Per-module norm chains (innermost first) where the modules of a site differ: a hybrid whose attention
    # layers are sandwiched and whose linear-attention layers are not, or Gemma 4's MoE branches, each
    # through its own norm and then a shared one. Derived specs state them; the table uses `post_norm`.
    chains: tuple[tuple[str, tuple[str, ...]], ...] = ()
    optional: bool = False  # a layer may have no writer here (one mixer per layer: Nemotron-H)

    def norms(self, module: str | None) -> tuple[str, ...]:
        """The norms between `module`'s output and the residual add, innermost first."""
        chains = dict(self.chains)
        if module is not None and module in chains:
            return chains[module]
        return () if self.post_norm is None else (self.post_norm,)


@dataclass(frozen=True)
class BiasRoute:
    """How a constant added to the residual stream is baked into a bias with stock config flags.

    `site="input"`: the bias of the last writer of layer L-1 (the MLP output) adds the vector at the
    input of layer L, exactly what the run-time hook at layer L does. `site="attn"`: the bias of layer
    L's attention output adds it after the attention of layer L (before its MLP).
    `flag` is the config flag that makes transformers create the biases of `group` (module suffixes
    inside a layer); missing ones are written as explicit zeros. `None` means the bias always exists.
    `target` is the module whose bias receives the vector. `relabel` rewrites the config as another
    stock architecture of the table that has the flag (Qwen2 / Mistral -> Llama).
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


def _config_scale(attr: str) -> Callable[[Any], float]:
    """A scalar config attribute (1 when absent) as a scale function."""

    def scale(cfg: Any) -> float:
        return float(getattr(cfg, attr, 1.0))

    scale.__name__ = attr
    return scale


def _default_sites() -> tuple[WriterSite, ...]:
    return (WriterSite("attn", ("self_attn",)), WriterSite("mlp", ("mlp",)))


@dataclass(frozen=True)
class ArchSpec:
    """Residual-stream facts of one `model_type` (see module docstring)."""

    model_type: str
    tensors: tuple[TensorRule, ...]
    stock_class: str  # the transformers class that loads it (AutoModelForCausalLM picks it from the config)
    layers: str = "layers"  # name of the decoder-layer list (module and tensor names)
    sites: tuple[WriterSite, ...] = field(default_factory=_default_sites)
    embeddings: tuple[str, ...] = ("embed_tokens",)  # siblings of the layer list that write
    final_norm: str = "norm"
    lm_head: str = "lm_head.weight"
    norm_offset: float = 0.0  # sandwich-norm gain = norm_offset + w
    embed_scale: Callable[[Any], float] = _one  # embedding output = scale * E[token]
    residual_scale: Callable[[Any], float] = _one  # writer output is multiplied by this before the add
    # Per-module output multipliers where writers of one layer differ (Falcon-H1's muP), instead of residual_scale.
    output_scales: tuple[tuple[str, Callable[[Any], float]], ...] = ()
    bias_routes: tuple[BiasRoute, ...] = ()
    experts_attrs: tuple[str, ...] = ()  # config attributes holding the number of routed experts
    text_model_type: str | None = None  # multimodal wrapper: the model_type of its `text_config`
    recurrent: bool = False  # some mixers carry a state (linear attention, SSM, convolution): no shared-prefix cache
    config_aliases: tuple[tuple[str, str], ...] = ()  # (standard name, this model's config.json key)
    notes: str = ""
    derived: bool = False  # derived from the model itself and verified (refusal_edit.derive), not hand-written

    def site(self, name: Site) -> WriterSite:
        return next(s for s in self.sites if s.name == name)

    @property
    def sandwich(self) -> bool:
        """A norm sits between some writer and the residual add."""
        return any(s.post_norm or any(c for _, c in s.chains) for s in self.sites)

    def post_norm_names(self, layer: int, site: Site, module: str | None = None) -> tuple[str, ...]:
        """Suffix names of the norm weights between `module` (a writer of `site`) and the add, innermost first."""
        if site == "embedding":
            return ()
        return tuple(f"{self.layers}.{layer}.{n}.weight" for n in self.site(site).norms(module))

    def post_norm_name(self, layer: int, site: Site) -> str | None:
        """Suffix name of the norm weight that follows the `site` writer of `layer`, if any (one norm)."""
        names = self.post_norm_names(layer, site)
        return names[-1] if names else None

    def num_experts(self, cfg: Any) -> int | None:
        for attr in self.experts_attrs:
            value = getattr(cfg, attr, None)
            if value:
                return int(value)
        return None

    def derive(self, model_type: str, **changes: Any) -> ArchSpec:
        """The same facts under another model_type (families whose residual layout is identical)."""
        return dataclasses.replace(self, model_type=model_type, **changes)

    def wrapper(self, model_type: str, stock_class: str) -> ArchSpec:
        """A multimodal wrapper around this language model: same writers, no config relabelling (the
        wrapper's config cannot become another architecture's), loaded by the wrapper's class."""
        routes = tuple(r for r in self.bias_routes if r.relabel is None)
        return self.derive(model_type, stock_class=stock_class, text_model_type=self.model_type, bias_routes=routes)


def layer_tensor(name: str, kind: TensorKind, site: Site, layers: str = "layers") -> TensorRule:
    """One tensor of every decoder layer (`name` relative to the layer, e.g. `mlp.experts.down_proj`)."""
    return TensorRule(rf"{layers}\.(?P<layer>\d+)\.{re.escape(name)}", kind, site)


def writer_rules(
    embeddings: tuple[str, ...],
    attn: tuple[str, ...],
    mlp: tuple[str, ...],
    layers: str = "layers",
    kind: TensorKind = "linear",
) -> tuple[TensorRule, ...]:
    """Embeddings, then each layer's attention and MLP output projections with their biases. Several
    modules per site: hybrids (one of them per layer) or parallel mixers (all of them)."""
    rules = [TensorRule(rf"{re.escape(e)}\.weight", "embedding", "embedding") for e in embeddings]
    for site, modules in (("attn", attn), ("mlp", mlp)):
        for module in modules:
            rules += [
                layer_tensor(f"{module}.weight", kind, site, layers),  # type: ignore[arg-type]
                layer_tensor(f"{module}.bias", "bias", site, layers),  # type: ignore[arg-type]
            ]
    return tuple(rules)


def _llama_like() -> tuple[TensorRule, ...]:
    return writer_rules(("embed_tokens",), ("self_attn.o_proj",), ("mlp.down_proj",))


def experts_rules(block: str, per_expert: str, fused: str = "mlp.experts.down_proj") -> tuple[TensorRule, ...]:
    """Routed experts of an MoE block: one tensor per expert (`block.experts.E.per_expert.weight`, how
    checkpoints store them) or one fused [E, H, I] tensor (`fused`, how transformers holds them in memory)."""
    layer = r"layers\.(?P<layer>\d+)\."
    return (
        TensorRule(rf"{layer}{re.escape(block)}\.experts\.\d+\.{re.escape(per_expert)}\.weight", "linear", "mlp", True),
        layer_tensor(fused, "experts", "mlp"),
    )


def shared_expert(module: str) -> tuple[TensorRule, ...]:
    """A shared (always active) expert's output projection, e.g. `mlp.shared_expert.down_proj`."""
    return writer_rules((), (), (module,))


_MOE_QWEN = (*experts_rules("mlp", "down_proj"), *shared_expert("mlp.shared_expert.down_proj"))
# GLM-4.5 / DeepSeek-V3: dense MLPs in the first `first_k_dense_replace` layers, then routed + shared experts.
_MOE_DEEPSEEK = (*experts_rules("mlp", "down_proj"), *shared_expert("mlp.shared_experts.down_proj"))

_ATTN_GROUP = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_MLP_GROUP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_ATTN_ROUTE = BiasRoute("attention_bias", "self_attn.o_proj", _ATTN_GROUP, "attn")
_MLP_ROUTE = BiasRoute("mlp_bias", "mlp.down_proj", _MLP_GROUP, "input")
# Qwen2 / Mistral have no bias flags of their own; LlamaForCausalLM computes the same function and has both.
_TO_LLAMA = (
    BiasRoute("mlp_bias", "mlp.down_proj", _MLP_GROUP, "input", relabel="llama"),
    BiasRoute("attention_bias", "self_attn.o_proj", _ATTN_GROUP, "attn", relabel="llama"),
)
_SANDWICH = (
    WriterSite("attn", ("self_attn",), "post_attention_layernorm"),
    WriterSite("mlp", ("mlp",), "post_feedforward_layernorm"),
)
# Pre-norm Llama-style blocks whose writers are named differently (hybrids and parallel mixers).
_FFN = WriterSite("mlp", ("feed_forward",))

LLAMA = ArchSpec("llama", _llama_like(), "LlamaForCausalLM", bias_routes=(_MLP_ROUTE, _ATTN_ROUTE))
GEMMA2 = ArchSpec(
    "gemma2",
    _llama_like(),
    "Gemma2ForCausalLM",
    sites=_SANDWICH,
    norm_offset=1.0,
    embed_scale=_sqrt_hidden,
    notes="sandwich norms: writers are orthogonalized against normalize((1 + w) * r)",
)
GEMMA3_TEXT = GEMMA2.derive("gemma3_text", stock_class="Gemma3ForCausalLM")
MISTRAL = LLAMA.derive("mistral", stock_class="MistralForCausalLM", bias_routes=_TO_LLAMA)
OLMO2 = GEMMA2.derive(
    "olmo2",
    stock_class="Olmo2ForCausalLM",
    norm_offset=0.0,
    embed_scale=_one,
    notes="sandwich norms: writers are orthogonalized against normalize(w * r)",
)
GRANITE = LLAMA.derive(
    "granite",
    stock_class="GraniteForCausalLM",
    embed_scale=_embedding_multiplier,
    residual_scale=_residual_multiplier,
)
MIXTRAL = LLAMA.derive(
    "mixtral",
    stock_class="MixtralForCausalLM",
    tensors=(*_llama_like(), *experts_rules("block_sparse_moe", "w2")),
    bias_routes=(),
    experts_attrs=("num_local_experts",),
)
GLM4_MOE = LLAMA.derive(
    "glm4_moe",
    stock_class="Glm4MoeForCausalLM",
    tensors=(*_llama_like(), *_MOE_DEEPSEEK),
    bias_routes=(),  # attention_bias covers q/k/v only: o_proj never has a bias
    experts_attrs=("n_routed_experts",),
    notes="dense MLPs in the first layers, then routed experts (each edited) and shared experts",
)
GPT2_EMBEDDINGS = ("wte", "wpe")

_SPECS = (
    LLAMA,
    MISTRAL,
    LLAMA.derive("qwen2", stock_class="Qwen2ForCausalLM", bias_routes=_TO_LLAMA),
    LLAMA.derive("qwen3", stock_class="Qwen3ForCausalLM", bias_routes=(_ATTN_ROUTE,)),
    LLAMA.derive("gemma", stock_class="GemmaForCausalLM", embed_scale=_sqrt_hidden, bias_routes=(_ATTN_ROUTE,)),
    GEMMA2,
    GEMMA3_TEXT,
    LLAMA.derive("phi3", stock_class="Phi3ForCausalLM", bias_routes=()),
    ArchSpec(
        "gpt2",
        writer_rules(GPT2_EMBEDDINGS, ("attn.c_proj",), ("mlp.c_proj",), layers="h", kind="conv1d"),
        "GPT2LMHeadModel",
        layers="h",
        sites=(WriterSite("attn", ("attn",)), WriterSite("mlp", ("mlp",))),
        embeddings=GPT2_EMBEDDINGS,
        config_aliases=(("hidden_size", "n_embd"), ("num_hidden_layers", "n_layer")),
        final_norm="ln_f",
        bias_routes=(BiasRoute(None, "mlp.c_proj", site="input"), BiasRoute(None, "attn.c_proj", site="attn")),
    ),
    ArchSpec(
        "gpt_neox",
        writer_rules(("embed_in",), ("attention.dense",), ("mlp.dense_4h_to_h",)),
        "GPTNeoXForCausalLM",
        sites=(WriterSite("attn", ("attention",)), WriterSite("mlp", ("mlp",))),
        embeddings=("embed_in",),
        final_norm="final_layer_norm",
        lm_head="embed_out.weight",
        bias_routes=(
            BiasRoute(None, "mlp.dense_4h_to_h", site="input"),
            BiasRoute("attention_bias", "attention.dense", ("attention.query_key_value", "attention.dense"), "attn"),
        ),
        notes="parallel residual: attention and MLP both write and are both edited",
    ),
    OLMO2,
    GRANITE,
    MIXTRAL,
    LLAMA.derive(
        "qwen2_moe",
        stock_class="Qwen2MoeForCausalLM",
        tensors=(*_llama_like(), *_MOE_QWEN),
        bias_routes=(),
        experts_attrs=("num_experts",),
    ),
    LLAMA.derive(
        "qwen3_moe",
        stock_class="Qwen3MoeForCausalLM",
        tensors=(*_llama_like(), *_MOE_QWEN),
        bias_routes=(_ATTN_ROUTE,),
        experts_attrs=("num_experts",),
    ),
    # ---- 2025-2026 families
    LLAMA.derive(
        "gpt_oss",
        stock_class="GptOssForCausalLM",
        tensors=(
            *writer_rules(("embed_tokens",), ("self_attn.o_proj",), ()),
            layer_tensor("mlp.experts.down_proj", "experts_t", "mlp"),
            layer_tensor("mlp.experts.down_proj_bias", "experts_bias", "mlp"),
        ),
        bias_routes=(_ATTN_ROUTE,),
        experts_attrs=("num_local_experts",),
        notes="fused experts stored [E, I, H] with per-expert output biases; attention sinks are not writers",
    ),
    GEMMA3_TEXT.wrapper("gemma3", "Gemma3ForConditionalGeneration"),
    MISTRAL.wrapper("mistral3", "Mistral3ForConditionalGeneration"),
    GLM4_MOE,
    GLM4_MOE.derive(
        "deepseek_v3",
        stock_class="DeepseekV3ForCausalLM",
        bias_routes=(
            BiasRoute(
                "attention_bias",
                "self_attn.o_proj",
                ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.o_proj"),
                "attn",
            ),
        ),
        notes="MLA attention (its o_proj writes); dense first layers, then routed and shared experts",
    ),
    LLAMA.derive(
        "qwen3_next",
        stock_class="Qwen3NextForCausalLM",
        recurrent=True,
        tensors=(
            *writer_rules(("embed_tokens",), ("self_attn.o_proj", "linear_attn.out_proj"), ("mlp.down_proj",)),
            *_MOE_QWEN,
        ),
        sites=(WriterSite("attn", ("self_attn", "linear_attn")), WriterSite("mlp", ("mlp",))),
        bias_routes=(_ATTN_ROUTE,),  # full-attention layers only (linear-attention layers have no o_proj)
        experts_attrs=("num_experts",),
        notes="hybrid: full-attention o_proj or gated-delta-net out_proj per layer (config.layer_types); "
        "dense MLPs in mlp_only_layers",
    ),
    LLAMA.derive("smollm3", stock_class="SmolLM3ForCausalLM"),
    OLMO2.derive("olmo3", stock_class="Olmo3ForCausalLM"),
    LLAMA.derive(
        "cohere2",
        stock_class="Cohere2ForCausalLM",
        bias_routes=(_ATTN_ROUTE,),
        notes="parallel block: attention and MLP read the same input; both write and are both edited",
    ),
    OLMO2.derive("exaone4", stock_class="Exaone4ForCausalLM"),
    LLAMA.derive(
        "seed_oss",
        stock_class="SeedOssForCausalLM",
        bias_routes=(_MLP_ROUTE, BiasRoute("attention_out_bias", "self_attn.o_proj", ("self_attn.o_proj",), "attn")),
    ),
    LLAMA.derive(
        "ernie4_5",
        stock_class="Ernie4_5ForCausalLM",
        bias_routes=(
            BiasRoute("use_bias", "mlp.down_proj", _ATTN_GROUP + _MLP_GROUP, "input"),
            BiasRoute("use_bias", "self_attn.o_proj", _ATTN_GROUP + _MLP_GROUP, "attn"),
        ),
    ),
    GRANITE.derive(
        "granitemoe",
        stock_class="GraniteMoeForCausalLM",
        tensors=(
            *writer_rules(("embed_tokens",), ("self_attn.o_proj",), ()),
            layer_tensor("block_sparse_moe.output_linear.weight", "experts", "mlp"),  # on disk
            layer_tensor("block_sparse_moe.experts.down_proj", "experts", "mlp"),  # in memory
        ),
        sites=(WriterSite("attn", ("self_attn",)), WriterSite("mlp", ("block_sparse_moe",))),
        bias_routes=(_ATTN_ROUTE,),
        experts_attrs=("num_local_experts",),
    ),
    MIXTRAL.derive("phimoe", stock_class="PhimoeForCausalLM", bias_routes=(_ATTN_ROUTE,)),
    OLMO2.derive(
        "glm4",
        stock_class="Glm4ForCausalLM",
        sites=(
            WriterSite("attn", ("self_attn",), "post_self_attn_layernorm"),
            WriterSite("mlp", ("mlp",), "post_mlp_layernorm"),
        ),
    ),
    LLAMA.derive(
        "falcon_h1",
        stock_class="FalconH1ForCausalLM",
        recurrent=True,
        tensors=writer_rules(("embed_tokens",), ("self_attn.o_proj", "mamba.out_proj"), ("feed_forward.down_proj",)),
        sites=(WriterSite("attn", ("self_attn", "mamba")), _FFN),
        final_norm="final_layernorm",
        embed_scale=_embedding_multiplier,
        output_scales=(
            ("self_attn", _config_scale("attention_out_multiplier")),
            ("mamba", _config_scale("ssm_out_multiplier")),
        ),  # the MLP applies its own down multiplier inside the module
        bias_routes=(),  # attention, Mamba and MLP outputs carry different muP multipliers
        notes="parallel mixer: attention and Mamba-2 read the same input; both write and are both edited",
    ),
    LLAMA.derive(
        "lfm2",
        stock_class="Lfm2ForCausalLM",
        recurrent=True,
        tensors=writer_rules(("embed_tokens",), ("self_attn.out_proj", "conv.out_proj"), ("feed_forward.w2",)),
        sites=(WriterSite("attn", ("self_attn", "conv")), _FFN),
        final_norm="embedding_norm",  # LFM2 names its final norm so
        bias_routes=(),
        notes="hybrid: attention out_proj or short-convolution out_proj per layer (config.layer_types)",
    ),
)

ARCHITECTURES: dict[str, ArchSpec] = {spec.model_type: spec for spec in _SPECS}
# The spec under verification answers before the table (refusal_edit.derive.verify), only while it is checked.
VERIFYING: dict[str, ArchSpec] = {}
# Specs derived for types outside the table, by model type, each with the test of the configs it answers for
# (`refusal_edit.derive.register` fills it; never by model type alone: a dense and an MoE config of one type,
# or two `layer_types` mixes, have different writers).
RESOLVED: dict[str, list[tuple[Callable[[Any], bool], ArchSpec]]] = {}
# Test-only: every model type goes through the derivation, as if the table were empty.
NO_TABLE_ENV = "REFUSAL_EDIT_NO_TABLE"


def table() -> dict[str, ArchSpec]:
    """The hand-written table (empty when the test-only switch `REFUSAL_EDIT_NO_TABLE=1` is set)."""
    import os

    return {} if os.environ.get(NO_TABLE_ENV) == "1" else ARCHITECTURES


def supported() -> list[str]:
    return sorted(ARCHITECTURES)


def model_type_of(config: Any) -> str | None:
    return config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)


def get_spec(model_type: str | None, config: Any = None) -> ArchSpec:
    """The spec for `model_type`: the table's entry, else the one derived for `config`'s structure in this
    process (`refusal_edit.derive.resolve_spec` derives it, above the edits that verify it); a clear error
    when neither exists (never a partial edit)."""
    key = model_type or ""
    spec = VERIFYING.get(key) or table().get(key) or _resolved(key, config)
    if spec is None:
        raise RefusalEditError(
            f"unsupported architecture {model_type!r}: not in the table and not derived in this process"
        )
    return spec


def _resolved(model_type: str, config: Any) -> ArchSpec | None:
    """The derived spec registered for `config` (the latest of its type when no config is given)."""
    entries = RESOLVED.get(model_type, [])
    if config is None:
        return entries[-1][1] if entries else None
    return next((spec for matches, spec in reversed(entries) if matches(config)), None)


def register(model_type: str, spec: ArchSpec, matches: Callable[[Any], bool]) -> None:
    """`spec` answers for the configs of `model_type` that `matches` accepts, in this process."""
    RESOLVED.setdefault(model_type, []).append((matches, spec))


def spec_for_config(config: Any) -> ArchSpec:
    """The spec of a config (a `config.json` dict or a transformers config): by its top-level model_type,
    so that a multimodal wrapper is its own entry (its stock class, no relabelling) and never mistaken
    for the bare language model inside."""
    return get_spec(model_type_of(config), config)


def is_recurrent(config: Any) -> bool:
    """Whether some layers carry a state (linear attention, SSM, convolution) that a shared-prefix KV cache
    cannot hold; False for types outside the table and not derived (judges and other helper models)."""
    model_type = model_type_of(config) or ""
    spec = table().get(model_type) or _resolved(model_type, config)
    return spec is not None and spec.recurrent


def text_config(config: Any) -> Any:
    """The language-model part of a (possibly multimodal) config."""
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def stock_model_class(config: Any) -> type:
    """The transformers class that loads a checkpoint of this config (AutoModelForCausalLM has no entry
    for some multimodal wrappers, e.g. Mistral 3)."""
    import transformers

    return getattr(transformers, spec_for_config(config).stock_class)


@dataclass
class TensorMatch:
    """One checkpoint tensor that the table says writes into the residual stream. `prefix` is what
    precedes the rule's match (`model.`, `language_model.model.`): the module that holds the writer."""

    name: str
    rule: TensorRule
    layer: int | None = field(default=None)
    prefix: str = ""


def classify(spec: ArchSpec, name: str) -> TensorMatch | None:
    """Which residual-writer rule `name` falls under, if any."""
    for rule in spec.tensors:
        m = rule.match(name)
        if m:
            layer = m.groupdict().get("layer")
            start = m.start() + 1 if m.start() > 0 else 0  # past the name-boundary dot
            return TensorMatch(name, rule, int(layer) if layer is not None else None, name[:start])
    return None
