"""Tiny random GGUF files written with gguf-py (llama.cpp names and metadata keys), for the GGUF edit tests.

Residual writers get the quant types a test asks for; K-quants need rows of 256 values, so HIDDEN and FF are
multiples of 256. Norm gains of Gemma-style models are stored as llama.cpp stores them (1 + w).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

from refusal_edit.gguf import quants

Q = GGMLQuantizationType
HIDDEN = 256
FF = 512
VOCAB = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
EXPERTS = 4


def _rand(rng: np.random.Generator, *shape: int, scale: float = 0.05) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _add(w: GGUFWriter, name: str, values: np.ndarray, qtype: GGMLQuantizationType) -> None:
    """`values` in HF orientation (last axis = ne0), stored as `qtype`."""
    rows = values.reshape(-1, values.shape[-1])
    if quants.can_quantize(qtype):
        data = quants.quantize(rows, qtype)
    else:  # a type nobody here writes (IQ4_NL): random levels under a small fp16 scale in each block
        block, size = GGML_QUANT_SIZES[qtype]
        raw = np.random.default_rng(7).integers(0, 256, (rows.size // block, size), dtype=np.uint8)
        raw[:, :2] = np.full((raw.shape[0], 1), 0.01, dtype=np.float16).view(np.uint8)
        data = raw.reshape(rows.shape[0], -1)
    raw_shape = (*values.shape[:-1], data.shape[-1])
    if qtype in (Q.F32, Q.F16):
        w.add_tensor(name, data.view(np.float32 if qtype == Q.F32 else np.float16).reshape(values.shape))
    else:
        w.add_tensor(name, data.reshape(raw_shape), raw_dtype=qtype)


def write_tiny(
    path: Path,
    arch: str = "qwen2",
    *,
    attn_type: GGMLQuantizationType = Q.Q5_0,
    ffn_type: GGMLQuantizationType | list[GGMLQuantizationType] = Q.Q4_K,
    embed_type: GGMLQuantizationType = Q.Q8_0,
    tied: bool = False,
    moe: bool = False,
    seed: int = 0,
    split_count: int | None = None,
    vocab: bool = False,
) -> Path:
    """A tiny `arch` model (qwen2, llama, gemma2, gemma3, qwen2moe) as GGUF; `ffn_type` per layer if a list.
    `vocab`: a minimal SentencePiece-style vocabulary, so that llama.cpp itself loads the file."""
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_string("general.name", f"tiny-{arch}")
    w.add_string("tokenizer.chat_template", "{{ messages }}")
    if split_count is not None:
        w.add_uint16("split.count", split_count)
    if vocab:
        w.add_tokenizer_model("llama")
        w.add_token_list([f"<t{i}>" for i in range(VOCAB)])
        w.add_token_scores([0.0] * VOCAB)
        w.add_token_types([3 if i < 3 else 1 for i in range(VOCAB)])  # 3: control (bos, eos, unk), 1: normal
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
    if moe:
        w.add_expert_count(EXPERTS)
        w.add_expert_used_count(2)
        w.add_expert_feed_forward_length(FF)
        w.add_expert_shared_feed_forward_length(FF)
    gemma = arch.startswith("gemma")
    norm = (lambda: 1.0 + _rand(rng, HIDDEN, scale=0.2)) if gemma else (lambda: 1.0 + _rand(rng, HIDDEN, scale=0.1))
    _add(w, "token_embd.weight", _rand(rng, VOCAB, HIDDEN, scale=0.5), embed_type)
    ffn_types = ffn_type if isinstance(ffn_type, list) else [ffn_type] * LAYERS
    for i in range(LAYERS):
        p = f"blk.{i}."
        _add(w, p + "attn_norm.weight", norm(), Q.F32)
        _add(w, p + "attn_q.weight", _rand(rng, HEADS * HEAD_DIM, HIDDEN), attn_type)
        _add(w, p + "attn_k.weight", _rand(rng, KV_HEADS * HEAD_DIM, HIDDEN), attn_type)
        _add(w, p + "attn_v.weight", _rand(rng, KV_HEADS * HEAD_DIM, HIDDEN), attn_type)
        if arch.startswith("qwen2"):
            for t, n in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)):
                _add(w, p + f"attn_{t}.bias", _rand(rng, n * HEAD_DIM), Q.F32)
        _add(w, p + "attn_output.weight", _rand(rng, HIDDEN, HEADS * HEAD_DIM), attn_type)
        _add(w, p + "ffn_norm.weight", norm(), Q.F32)
        if gemma:
            _add(w, p + "post_attention_norm.weight", norm(), Q.F32)
            _add(w, p + "post_ffw_norm.weight", norm(), Q.F32)
        if arch == "gemma3":
            _add(w, p + "attn_q_norm.weight", 1.0 + _rand(rng, HEAD_DIM), Q.F32)
            _add(w, p + "attn_k_norm.weight", 1.0 + _rand(rng, HEAD_DIM), Q.F32)
        if moe:
            _add(w, p + "ffn_gate_inp.weight", _rand(rng, EXPERTS, HIDDEN), Q.F32)
            _add(w, p + "ffn_gate_exps.weight", _rand(rng, EXPERTS, FF, HIDDEN), Q.Q8_0)
            _add(w, p + "ffn_up_exps.weight", _rand(rng, EXPERTS, FF, HIDDEN), Q.Q8_0)
            _add(w, p + "ffn_down_exps.weight", _rand(rng, EXPERTS, HIDDEN, FF), ffn_types[i])
            _add(w, p + "ffn_gate_inp_shexp.weight", _rand(rng, HIDDEN), Q.F32)
            _add(w, p + "ffn_gate_shexp.weight", _rand(rng, FF, HIDDEN), Q.Q8_0)
            _add(w, p + "ffn_up_shexp.weight", _rand(rng, FF, HIDDEN), Q.Q8_0)
            _add(w, p + "ffn_down_shexp.weight", _rand(rng, HIDDEN, FF), ffn_types[i])
        else:
            _add(w, p + "ffn_gate.weight", _rand(rng, FF, HIDDEN), Q.Q8_0)
            _add(w, p + "ffn_up.weight", _rand(rng, FF, HIDDEN), Q.Q8_0)
            _add(w, p + "ffn_down.weight", _rand(rng, HIDDEN, FF), ffn_types[i])
    _add(w, "output_norm.weight", norm(), Q.F32)
    if not tied:
        _add(w, "output.weight", _rand(rng, VOCAB, HIDDEN, scale=0.5), Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
