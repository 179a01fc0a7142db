"""Tiny random models of every supported architecture, built from configs (no downloads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

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
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.2,
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
        max_position_embeddings=128,
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
    "qwen3_moe": dict(BASE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, attention_bias=True),
}


def build(model_type: str, seed: int = 0, **overrides: Any):
    """A tiny random model whose norms and biases are perturbed away from their init, so they matter."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**CONFIGS[model_type], **overrides})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
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


def token_batch(seed: int = 1, batch: int = 3, length: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)
