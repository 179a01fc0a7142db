"""Loading a model in 4 or 8 bits with bitsandbytes (`load_in`), for models that do not fit in bf16.

Which commands take it, and why: `extract`, `tune` and `evaluate` only *run* the model (activations,
generation, hooks on the residual stream), so a quantized model serves them as it serves heretic's and
llm-abliteration's users: the direction is extracted from the quantized model's activations, and tune and
evaluate measure the edit as hooks on it. `orthogonalize` never takes it: the edit is computed exactly on
the full-precision weights it streams from the checkpoint, and a quantized checkpoint is not an output we
write. Edits with no hook twin (norm preservation) edit weights in memory and are refused on a quantized
model (`edits.memory`); tune leaves them out of its search there.

bitsandbytes is an optional extra (`pip install 'refusal-edit[quant]'`, a 40 MB wheel). Whether it can
quantize on the device picked is tried on a tiny tensor, not guessed from its version: recent releases run
4- and 8-bit layers on the CPU as well as on CUDA, older ones on CUDA only, and a device it cannot serve is a
one-line error before any weight is read.
"""

from __future__ import annotations

import logging
from functools import cache
from typing import Any

from refusal_edit.errors import RefusalEditError

LOAD_IN = ("4bit", "8bit")


def check_load_in(load_in: str | None) -> str | None:
    if load_in is not None and load_in not in LOAD_IN:
        raise RefusalEditError(f"unknown `load_in` {load_in!r} ({', '.join(LOAD_IN)})")
    return load_in


@cache
def _cannot_run(load_in: str, device: str) -> str:
    """Why bitsandbytes cannot quantize `load_in` on `device` ("" when it can): one tiny tensor, both ways."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return "needs bitsandbytes, an optional extra: pip install 'refusal-edit[quant]'"
    import torch

    try:
        x = torch.randn(64, 64, device=device)
        if load_in == "4bit":
            q, state = bnb.functional.quantize_4bit(x, quant_type="nf4")
            bnb.functional.dequantize_4bit(q, state)
        else:
            layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False).to(device)
            layer(x.half() if device != "cpu" else x)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        version = getattr(bnb, "__version__", "?")
        return f"bitsandbytes {version} cannot run {load_in} layers on {device} ({first}): use a CUDA GPU"
    return ""


def quantization_config(load_in: str | None, device: str, compute_dtype: Any) -> Any:
    """transformers' `BitsAndBytesConfig` for `load_in` on `device` (cpu | cuda | mps), or None without
    `load_in`; a one-line error where bitsandbytes is missing or cannot run there. 4-bit layers are NF4 with
    double quantization (QLoRA's choice: the least error per bit) and compute in `compute_dtype`."""
    if check_load_in(load_in) is None:
        return None
    why = _cannot_run(load_in, device)
    if why:
        raise RefusalEditError(f"`load_in` {load_in} {why}")
    from transformers import BitsAndBytesConfig

    # bitsandbytes warns on every 8-bit matmul that it casts the inputs to float16: `describe` says it once.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if load_in == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def describe(load_in: str, compute_dtype: Any) -> str:
    """The load line's words for `load_in`: 8-bit layers take float16 inputs whatever the model's dtype."""
    dtype = str(compute_dtype).removeprefix("torch.")
    inside = "float16 in its int8 layers, " if load_in == "8bit" else ""
    return f"loaded in {load_in} by bitsandbytes (computing in {inside}{dtype}{' elsewhere' if inside else ''})"
