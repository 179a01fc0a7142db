"""Hugging Face view of a GGUF file: the config from its metadata, HF names for its tensors.

Both come from transformers' own GGUF loader, so a GGUF edit sees exactly the names, config and basis that
`refusal-edit fetch` (which dequantizes through transformers) gave the model the direction was found on:
- config: transformers' table of GGUF metadata keys (`GGUF_CONFIG_MAPPING`), read for the architecture's own
  keys only (its loader also parses the whole vocabulary, seconds for nothing here);
- names: transformers' `get_gguf_hf_weights_map` on the model built from that config on the meta device
  (no memory), which runs gguf-py's tensor-name table over the model's real parameter names.
"""

from __future__ import annotations

from typing import Any

from refusal_edit.arch import ARCHITECTURES
from refusal_edit.errors import RefusalEditError
from refusal_edit.gguf.file import GGUFFile

# GGUF architecture -> (key of transformers' config table, HF model_type), where they differ from the name.
# The same renames transformers' `load_gguf_checkpoint` applies.
_ARCH_RENAMES = {
    "qwen2moe": ("qwen2_moe", "qwen2_moe"),
    "qwen3moe": ("qwen3_moe", "qwen3_moe"),
    "gemma3": ("gemma3", "gemma3_text"),
    "gemma4": ("gemma4", "gemma4_text"),
    "minimax-m2": ("minimax_m2", "minimax_m2"),
}
# Architectures whose GGUF layout is not the HF layout reversed (llama.cpp transposes GPT-2's Conv1D).
_TRANSPOSED = ("gpt2",)


def hf_model_type(gguf: GGUFFile) -> str:
    return _ARCH_RENAMES.get(gguf.arch, (gguf.arch, gguf.arch))[1]


def hf_config(gguf: GGUFFile) -> dict[str, Any]:
    """The HF config of the model in `gguf`, from its metadata and tensor shapes."""
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

    table_key, model_type = _ARCH_RENAMES.get(gguf.arch, (gguf.arch, gguf.arch))
    table = GGUF_CONFIG_MAPPING.get(table_key)
    if gguf.arch in _TRANSPOSED or table is None or model_type not in ARCHITECTURES:
        readable = sorted(
            a
            for a in {*GGUF_CONFIG_MAPPING, *_ARCH_RENAMES}
            if _ARCH_RENAMES.get(a, (a, a))[1] in ARCHITECTURES and a not in _TRANSPOSED and "_" not in a
        )  # as llama.cpp spells its architectures (qwen2moe, gpt-oss: never with an underscore)
        why = ""
        if table is not None and gguf.arch not in _TRANSPOSED:
            # Derived specs hold HF facts only; how llama.cpp's converter stores the writers (names, norm gains,
            # expert layouts) is a fact of the table, checked against llama.cpp, with no derivation to see it.
            why = (
                " (its residual writers are derived from the HF model, and llama.cpp's storage of them has no "
                "independent check: give `out` a directory to edit the dequantized model as safetensors)"
            )
        raise RefusalEditError(
            f"GGUF architecture {gguf.arch!r} cannot be edited as GGUF{why}; supported: {', '.join(readable)}"
        )
    config: dict[str, Any] = {"model_type": model_type}
    prefix = gguf.arch + "."
    for key in gguf.keys():
        if not key.startswith(prefix):
            continue
        target = table.get(key[len(prefix) :])
        if target:
            value = gguf.value(key)
            config[target] = value[0] if isinstance(value, list) and len(value) == 1 else value
    for key, value in GGUF_CONFIG_DEFAULTS_MAPPING.get(model_type, {}).items():
        config.setdefault(key, value)
    embed = gguf.tensors.get("token_embd.weight")
    if embed is not None and len(embed.ne) == 2:
        config.setdefault("hidden_size", embed.ne[0])
        config.setdefault("vocab_size", embed.ne[1])
    config["tie_word_embeddings"] = "output.weight" not in gguf.tensors
    for key in ("hidden_size", "num_hidden_layers"):
        if not isinstance(config.get(key), int):
            raise RefusalEditError(f"{gguf.path.name}: metadata {gguf.arch}.* gives no {key}")
    return config


def gguf_arch(model_type: str) -> str:
    """The GGUF architecture of an HF `model_type` whose GGUF tensors are its HF tensors renamed (the reverse
    of `hf_model_type`); anything else is a one-line error naming those there are."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    covered = {}  # HF model type -> GGUF architecture, for the tables transformers has
    for key in GGUF_CONFIG_MAPPING:
        arch, (_, mt) = next(((a, r) for a, r in _ARCH_RENAMES.items() if r[0] == key), (key, (key, key)))
        if arch not in _TRANSPOSED and mt in ARCHITECTURES:
            covered[mt] = arch
    if model_type not in covered:
        raise RefusalEditError(
            f"no GGUF tensor names for model type {model_type!r}: transformers' GGUF tables cover "
            f"{', '.join(sorted(covered))}"
        )
    return covered[model_type]


def gguf_names(config: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """The GGUF architecture of a model of `config` (an HF config.json) and its HF parameter name -> GGUF tensor
    name, as llama.cpp's converter names them (the inverse of `weights_map`; a name two GGUF tensors claim is
    left out). A multimodal wrapper is named as its text model."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    model_type = text.get("model_type", config.get("model_type"))
    arch = gguf_arch(model_type)
    claimed: dict[str, list[str]] = {}
    for g, hf in weights_map(None, {**text, "model_type": model_type}).items():
        claimed.setdefault(hf, []).append(g)
    return arch, {hf: gs[0] for hf, gs in claimed.items() if len(gs) == 1}


def weights_map(gguf: GGUFFile | None, config: dict[str, Any]) -> dict[str, str]:
    """GGUF tensor name -> HF parameter name for every parameter of the architecture (present in the file or
    not: a tied model's `output.weight` maps to `lm_head.weight`). Fused expert parameters have no `.weight`
    in HF; their entries are given with the `.weight` their GGUF tensors carry. `gguf`: the file the config
    came from (None: an HF config), for the error message."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    model_type = config["model_type"]
    try:
        hf = AutoConfig.for_model(**config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf)
    except Exception as exc:
        where = f"{gguf.path.name}'s metadata" if gguf is not None else "its config"
        raise RefusalEditError(f"cannot build the {model_type} layout from {where}: {exc}") from None
    arch = next((k for k, (_, mt) in _ARCH_RENAMES.items() if mt == model_type), model_type)
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=hf.to_dict())
    mapping = get_gguf_hf_weights_map(model, processor, model_type=arch, num_layers=int(config["num_hidden_layers"]))
    return {(k if k.endswith((".weight", ".bias")) else k + ".weight"): v for k, v in mapping.items()}
