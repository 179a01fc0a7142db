"""Tiny random models of every supported architecture, built from configs (no downloads).

Every table entry has a config here (tests/test_archs.py checks it). Multimodal wrappers get a tiny
vision tower with as many layers as the language model, so that nothing can find the language model's
layers by their count alone. Configs keep 3 layers and hidden size 32: the suite runs every one of them
through several edits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from refusal_edit.arch import stock_model_class
from refusal_edit.derive import resolve_spec

HIDDEN = 32
VOCAB = 128

BASE = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=512,  # the built-in prompts with a chat template fit (extract and evaluate check it)
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.2,
)

VISION = dict(
    hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2, image_size=16, patch_size=8
)
DEEPSEEK_MOE = dict(
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    n_shared_experts=1,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
)

CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(BASE, attention_bias=True, mlp_bias=True),
    "mistral": dict(BASE),
    "qwen2": dict(BASE),
    "qwen3": dict(BASE, attention_bias=True),
    "gemma": dict(BASE),
    "gemma2": dict(BASE, query_pre_attn_scalar=8, final_logit_softcapping=None, attn_logit_softcapping=None),
    "gemma3_text": dict(BASE, query_pre_attn_scalar=8, sliding_window=16),
    "phi3": dict(BASE),
    "gpt2": dict(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=3,
        n_head=4,
        n_positions=128,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    ),
    "gpt_neox": dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=512,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    ),
    "olmo2": dict(BASE),
    "granite": dict(
        BASE, embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.3, logits_scaling=2.0
    ),
    "mixtral": dict(BASE, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        BASE,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
    ),
    "qwen3_moe": dict(
        BASE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, attention_bias=True, mlp_only_layers=[0]
    ),
    # gpt-oss: intermediate size = hidden size, as in the real models: the [E, I, H] layout must come from the
    # table, not from the shapes.
    "gpt_oss": dict(
        BASE,
        intermediate_size=HIDDEN,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters=dict(rope_type="default", rope_theta=10000.0),
    ),
    "gemma3": dict(
        text_config=dict(BASE, model_type="gemma3_text", query_pre_attn_scalar=8, sliding_window=16),
        vision_config=dict(VISION, model_type="siglip_vision_model"),
        mm_tokens_per_image=4,
        image_token_index=5,
        boi_token_index=6,
        eoi_token_index=7,
    ),
    "mistral3": dict(
        text_config=dict(BASE, model_type="mistral"),
        vision_config=dict(VISION, model_type="pixtral", head_dim=8),
        image_token_index=5,
        spatial_merge_size=1,
    ),
    "glm4_moe": dict(BASE, **DEEPSEEK_MOE, partial_rotary_factor=0.5),
    "deepseek_v3": dict(
        BASE,
        **DEEPSEEK_MOE,
        q_lora_rank=16,
        kv_lora_rank=8,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=8,
        head_dim=4,
        num_key_value_heads=4,  # MLA expands the latent to every head, as in the real models
    ),
    "qwen3_next": dict(
        BASE,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
        mlp_only_layers=[2],
        linear_num_value_heads=4,
        linear_num_key_heads=2,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_conv_kernel_dim=4,
    ),
    "smollm3": dict(BASE, attention_bias=True, no_rope_layers=[1, 0, 1]),
    "olmo3": dict(BASE, sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "cohere2": dict(BASE, sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "exaone4": dict(BASE, sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "seed_oss": dict(BASE, attention_out_bias=True, mlp_bias=True),
    "ernie4_5": dict(BASE),
    "granitemoe": dict(
        BASE,
        num_local_experts=4,
        num_experts_per_tok=2,
        embedding_multiplier=3.0,
        residual_multiplier=0.5,
        attention_multiplier=0.3,
        logits_scaling=2.0,
    ),
    "phimoe": dict(BASE, num_local_experts=4, num_experts_per_tok=2, attention_bias=True),
    "glm4": dict(BASE, partial_rotary_factor=0.5),
    "falcon_h1": dict(
        BASE,
        mamba_d_ssm=32,
        mamba_n_heads=4,
        mamba_d_head=8,
        mamba_d_state=8,
        mamba_n_groups=1,
        mamba_chunk_size=8,
        mamba_rms_norm=True,
        embedding_multiplier=2.0,
        attention_out_multiplier=0.7,
        ssm_out_multiplier=1.3,
        mlp_multipliers=[0.9, 1.1],
        lm_head_multiplier=0.8,
    ),
    "lfm2": dict(BASE, layer_types=["conv", "full_attention", "conv"], block_auto_adjust_ff_dim=False, conv_L_cache=3),
}


def build(model_type: str, seed: int = 0, **overrides: Any):
    """A tiny random model whose norms and biases are perturbed away from their init, so they matter."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**CONFIGS[model_type], **overrides})
    resolve_spec(config)  # a type outside the table is derived here, as loading does
    model = stock_model_class(config)._from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 .,;:!?'\"-()/")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] != 'system' %}<|system|>you are a tiny test model.<|end|>{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    """A character-level tokenizer (lower-cased) with a chat template and a default system prompt."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=SPECIALS[4:],
    )
    fast.chat_template = chat_template
    return fast


def save(model, path: Path, with_tokenizer: bool = True) -> Path:
    """Save a tiny model (and the tiny tokenizer) as an ordinary HF directory."""
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    if with_tokenizer:
        tokenizer().save_pretrained(path)
    return path


def load(path: Path):
    """Load a saved tiny model with its stock class (AutoModelForCausalLM has no entry for some wrappers)."""
    import json

    config = json.loads((Path(path) / "config.json").read_text())
    resolve_spec(config)
    cls = stock_model_class(config)
    return cls.from_pretrained(path, dtype=torch.float32).eval()


def token_batch(seed: int = 1, batch: int = 3, length: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def mixed_edits(seed: int = 3, n_layers: int = 3) -> list:
    """Three edits for row-grouped hooks (several points in one batch): the paper's, none (the base model) and
    a partial one, along one random direction."""
    from refusal_edit.edits.spec import DirectionBank, EditSpec, Strength, resolve

    bank = DirectionBank(torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed)))
    partial = EditSpec(attn=Strength(weight=0.5), mlp=Strength.window(1, 2), embedding=0.0)
    return [resolve(EditSpec(), bank, n_layers), None, resolve(partial, bank, n_layers)]
