"""A tiny random instance of a model type, built from the user's own config with its widths shrunk.

What decides where a decoder layer writes (its modules, norms, layer kinds, expert layout) survives the
shrink: only sizes change. Layers are cut to the shortest prefix that still holds one layer of every
structure the full depth has (compared module by module on the meta device), and kept whole where a cut
would change a layer's structure.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from refusal_edit.errors import RefusalEditError

HIDDEN = 64
HEADS = 4
HEAD_DIM = 16
FF = 96
MOE_FF = 32
VOCAB = 256
EXPERTS = 5  # distinct from every other count of the shrunk config: the expert count is found by value
TOP_K = 2
MAX_PARAMS = 20_000_000  # a shrunk model is ~1M parameters; far above that, the shrink missed a width

# Widths by config key (only lowered, never raised).
_SIZES = {
    "hidden_size": HIDDEN,
    "n_embd": HIDDEN,
    "d_model": HIDDEN,
    "head_dim": HEAD_DIM,
    "attention_head_dim": HEAD_DIM,
    "kv_channels": HEAD_DIM,
    "rotary_dim": HEAD_DIM,
    "global_head_dim": HEAD_DIM,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "qk_head_dim": 16,
    "v_head_dim": HEAD_DIM,
    "q_lora_rank": 32,
    "kv_lora_rank": 16,
    "o_lora_rank": 32,
    "vocab_size": VOCAB,
    "num_experts_per_tok": TOP_K,
    "num_experts_per_token": TOP_K,
    "moe_topk": TOP_K,
    "moe_k": TOP_K,
    "top_k_experts": TOP_K,
    "n_group": 1,
    "topk_group": 1,
    "n_shared_experts": 1,
    "num_shared_experts": 1,
    "linear_num_value_heads": HEADS,
    "linear_num_key_heads": 2,
    "linear_key_head_dim": HEAD_DIM,
    "linear_value_head_dim": HEAD_DIM,
    "mamba_num_heads": HEADS,
    "mamba_n_heads": HEADS,
    "mamba_head_dim": 2 * HIDDEN // HEADS,
    "mamba_d_head": 2 * HIDDEN // HEADS,
    "mamba_d_ssm": 2 * HIDDEN,
    "ssm_state_size": 16,
    "mamba_d_state": 16,
    "state_size": 16,
    "n_groups": 1,
    "mamba_n_groups": 1,
    "hidden_size_per_layer_input": 16,
    "vocab_size_per_layer_input": VOCAB,
    "num_heads": HEADS,
    "n_head": HEADS,
    "num_attention_heads": HEADS,
}
_WIDTHS = {k for k in _SIZES if not k.startswith(("num_", "n_", "vocab", "moe_k", "top"))} | {
    "intermediate_size",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
}
_EXPERT_COUNTS = (
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "moe_num_experts",
    "num_routed_experts",
)
_KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num")
_TOKEN_KEYS = ("_token_id", "_token_index", "_token_ids")


def _lower(d: dict[str, Any], key: str, value: int) -> None:
    old = d.get(key)
    if isinstance(old, int) and not isinstance(old, bool) and old > value:
        d[key] = value


# Widths whose equalities the shrink keeps (DeepSeek's head_dim is its rope dim; gpt-oss's intermediate size is
# its hidden size, a layout trap the tiny model must keep).
_COUNTS = {"num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "top_k_experts", "n_group"}
_COUNTS |= {"topk_group", "n_shared_experts", "num_shared_experts", "n_groups", "mamba_n_groups"}


def _keep_equal(original: dict[str, Any], d: dict[str, Any]) -> None:
    groups: dict[int, list[str]] = {}
    for key, value in original.items():
        if key in _COUNTS or d.get(key) == value or not isinstance(value, int) or isinstance(value, bool):
            continue
        groups.setdefault(value, []).append(key)
    for value in groups:
        same = [k for k, v in original.items() if v == value and k not in _COUNTS and k in _WIDTHS]
        if len(same) > 1:
            small = min(d[k] for k in same)
            for k in same:
                d[k] = small


def _keep_products(original: dict[str, Any], d: dict[str, Any]) -> None:
    """Where a width was the product of two others (Mamba's d_ssm = heads x head dim), keep it so."""
    ints = {k: v for k, v in original.items() if isinstance(v, int) and not isinstance(v, bool) and v > 1}
    changed = [k for k in ints if d.get(k) != ints[k] and k in _WIDTHS]
    for a in changed:
        for b in ints:
            for c in ints:
                related = b <= c and a not in (b, c) and ints[a] == ints[b] * ints[c]
                if related and (b in changed or c in changed) and d[b] * d[c] <= ints[a]:
                    d[a] = d[b] * d[c]


def _shrink_dict(d: dict[str, Any], heads: int) -> dict[str, Any]:
    original = d
    d = copy.deepcopy(d)
    for key, value in _SIZES.items():
        _lower(d, key, value)
    for key in _EXPERT_COUNTS:
        _lower(d, key, EXPERTS)
    spare = iter(range(VOCAB - 1, VOCAB - 64, -1))  # distinct small ids for special tokens out of range
    for key in list(d):
        if key.endswith("intermediate_size") or key in ("ffn_hidden_size", "n_inner", "ffn_dim", "d_ff"):
            small = MOE_FF if ("moe" in key or "expert" in key) else FF
            _lower(d, key, small)
        if key.endswith(("_num_heads", "_head_dim")) and key not in _SIZES:  # linear attention, SSM mixers
            _lower(d, key, HEADS if key.endswith("heads") else HEAD_DIM)
        if key.endswith(_TOKEN_KEYS):
            value = d[key]
            if isinstance(value, int) and value >= VOCAB:
                d[key] = next(spare)
            elif isinstance(value, list):
                d[key] = [v for v in value if isinstance(v, int) and v < VOCAB] or [2]
    _keep_equal(original, d)
    _keep_products(original, d)
    for key, value in d.items():  # nested sub-models (towers, BLT's byte encoder and decoder): shrunk too
        if isinstance(value, dict) and any(k in value for k in _WIDTH_KEYS):
            d[key] = _tower(value)
    for key in _KV_HEADS:
        kv = d.get(key)
        if isinstance(kv, int) and not isinstance(kv, bool) and kv > 1:
            d[key] = HEADS if kv >= heads else 2
    return d


_WIDTH_KEYS = ("hidden_size", "d_model", "n_embd")
_DEPTHS = ("num_hidden_layers", "depth", "num_layers", "num_blocks")


def _tower(sub: dict[str, Any]) -> dict[str, Any]:
    """A nested sub-model's config shrunk like the language model's, two layers deep (its structure is not
    what is derived: it only has to build, small)."""
    small = _shrink_dict(sub, int(sub.get("num_attention_heads") or sub.get("num_heads") or HEADS))
    for key in small:  # convolution widths of audio encoders (Phi-4-multimodal's: 1024 = its hidden size)
        if key.endswith(("_channels", "_channel")):
            _lower(small, key, HIDDEN)
    for depth in _DEPTHS:
        if isinstance(small.get(depth), int) and small[depth] > 2:
            small[depth] = 2
    return small


def shrunk(config: Any) -> Any:
    """The text config of `config` with small widths (a new transformers config of the same model_type)."""
    from transformers import AutoConfig

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    d = text.to_dict()
    heads = int(d.get("num_attention_heads") or d.get("n_head") or HEADS)
    d = _shrink_dict(d, heads)
    d["initializer_range"] = 0.2
    model_type = d.pop("model_type", None) or text.model_type
    for key in ("architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        d.pop(key, None)
    try:
        return AutoConfig.for_model(model_type, **d)
    except Exception as exc:
        raise RefusalEditError(f"cannot build a shrunk {model_type} config: {exc}") from exc


def _per_layer_keys(d: dict[str, Any], n: int) -> list[str]:
    return [k for k, v in d.items() if isinstance(v, (list, str)) and len(v) == n and k not in ("model_type",)]


def _signature(layer: nn.Module) -> tuple:
    return tuple((name, type(m).__name__) for name, m in layer.named_modules()) + tuple(
        (name, tuple(p.shape)) for name, p in layer.named_parameters()
    )


def model_class(config: Any) -> type:
    """The class that builds the language model of `config`: its causal LM, else its base model."""
    from transformers import AutoModel, AutoModelForCausalLM

    for auto in (AutoModelForCausalLM, AutoModel):
        try:
            return auto._model_mapping[type(config)]
        except KeyError:
            continue
    raise RefusalEditError(f"transformers has no model class for {config.model_type!r}")


def layer_list(model: nn.Module, n_layers: int) -> tuple[str, nn.ModuleList]:
    """The decoder-layer list: the first ModuleList with one entry per layer (the language model's)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and n_layers:
            return name, module
    raise RefusalEditError(f"could not find {n_layers} decoder layers in the {type(model).__name__} model")


def _num_layers(config: Any) -> int:
    return int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0) or 0)


def _cut(config: Any, cls: type, max_layers: int) -> Any:
    """The config with the fewest leading layers that keep every layer structure of the full depth."""
    n = _num_layers(config)
    if n <= max_layers:
        return config
    try:
        with torch.device("meta"):
            full = cls._from_config(config)
        _, layers = layer_list(full, n)
        signatures = [_signature(layer) for layer in layers]
    except Exception:
        return config
    kinds = set(signatures)
    keep = next(i + 1 for i in range(n) if set(signatures[: i + 1]) == kinds)
    keep = max(keep, 2)
    if keep >= n:
        return config
    d = config.to_dict()
    for key in _per_layer_keys(d, n):
        d[key] = d[key][:keep]
    for key, value in d.items():  # per-layer overrides keyed by layer index (transformers' heterogeneity)
        if isinstance(value, dict) and value and all(str(k).isdigit() and int(k) < n for k in value):
            d[key] = {k: v for k, v in value.items() if int(k) < keep}
    d["num_hidden_layers"] = keep
    model_type = d.pop("model_type")
    from transformers import AutoConfig

    try:
        cut = AutoConfig.for_model(model_type, **d)
        with torch.device("meta"):
            small = cls._from_config(cut)
        _, layers = layer_list(small, keep)
        if [_signature(layer) for layer in layers] == signatures[:keep]:
            return cut
    except Exception:
        pass
    return config


def _check_size(cls: type, small: Any) -> None:
    """Refuse, before allocating, a shrunk model that is not tiny: some part of its config the shrink does not
    reach (a hashed byte vocabulary, an unknown width key) would make the derivation take minutes."""
    try:
        with torch.device("meta"):
            count = sum(p.numel() for p in cls._from_config(small).parameters())
    except Exception:
        return  # the real build says why
    if count > MAX_PARAMS:
        raise RefusalEditError(
            f"the shrunk {small.model_type} config still builds {count / 1e6:.0f}M parameters (a part of the config "
            f"the shrink does not reach); refused rather than derived on a model that large"
        )


def tiny_model(config: Any, seed: int = 0, max_layers: int = 6) -> nn.Module:
    """A tiny random float32 model of `config`'s language model; every parameter is perturbed away from its
    init (zero-initialised projections, unit norms), so that each one matters."""
    small = shrunk(config)
    if not _num_layers(small):
        raise RefusalEditError(
            f"the {small.model_type} config states no number of decoder layers (num_hidden_layers): no single "
            "stack of layers writes its residual stream"
        )
    cls = model_class(small)
    small = _cut(small, cls, max_layers)
    _check_size(cls, small)
    torch.manual_seed(seed)
    try:
        model = cls._from_config(small, dtype=torch.float32)
    except Exception as exc:
        raise RefusalEditError(f"cannot build a tiny {small.model_type} model: {exc}") from exc
    with torch.no_grad():
        for p in model.parameters():
            p.add_((0.3 if p.dim() == 1 else 0.02) * torch.randn_like(p))
    return model.eval()


def tiny_wrapper(config: Any, seed: int = 0, max_layers: int = 6) -> nn.Module:
    """The whole multimodal wrapper of `config`, tiny, built with its stock class (the causal LM's where
    transformers has one, as `build._stock_class` picks, else the image-text class): the text config
    shrunk and cut as `tiny_model` does, each tower (vision, audio) shrunk the same way with two layers.
    The derivation verifies the language model alone; this is what checks the wrapper's own class."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    data = config.to_dict()
    model_type = data.pop("model_type", None) or config.model_type
    text = shrunk(config)
    try:
        data["text_config"] = _cut(text, model_class(text), max_layers).to_dict()
        for key in ("vision_config", "audio_config"):
            sub = data.get(key)
            if isinstance(sub, dict):
                data[key] = _tower(sub)
        cfg = AutoConfig.for_model(model_type, **data)
        torch.manual_seed(seed)
        auto = AutoModelForCausalLM if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else AutoModelForImageTextToText
        model = auto.from_config(cfg, dtype=torch.float32)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RefusalEditError(f"cannot build a tiny {model_type} wrapper to verify the edit on: {reason}") from exc
    with torch.no_grad():
        for p in model.parameters():
            p.add_((0.3 if p.dim() == 1 else 0.02) * torch.randn_like(p))
    return model.eval()
