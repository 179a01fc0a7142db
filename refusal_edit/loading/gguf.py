"""GGUF input: dequantize once with transformers, cache the result as an ordinary safetensors model.

`save_pretrained` refuses a model loaded from GGUF ("quantized with gguf and is not serializable") until
its quantization config is removed; the cached directory is then a plain HF model that every other part
of the tool (and streaming edits) can read. The cache is keyed by the file's sha256 and the dtype, so a
second load takes seconds instead of the dequantization time.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from refusal_edit.checkpoint.atomic import atomic_dir
from refusal_edit.console import console
from refusal_edit.errors import RefusalEditError
from refusal_edit.loading.cache import cache_root, cached_sha256

MARKER = "refusal_edit_source.json"


def converted_dir(path: Path, dtype: str) -> tuple[Path, str]:
    sha = cached_sha256(path)
    return cache_root() / "gguf" / f"{path.stem}-{sha[:16]}-{dtype}", sha


def convert_gguf(path: Path, dtype: str = "float32") -> tuple[Path, str]:
    """Return (HF directory, sha256) for a GGUF file, converting it on first use."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise RefusalEditError(f"GGUF file not found: {path}")
    out, sha = converted_dir(path, dtype)
    if (out / MARKER).is_file():
        return out, sha
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    console.print(f"[dim]dequantizing {path.name} once (cached in {out})[/dim]")
    with atomic_dir(out, force=True) as tmp:
        previous = logging.getLogger("transformers").level
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch_dtype)
        except Exception as exc:
            raise RefusalEditError(f"cannot read GGUF file {path}: {exc}") from exc
        finally:
            logging.getLogger("transformers").setLevel(previous)
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(
            json.dumps(
                {
                    "gguf_file": path.name,
                    "sha256": sha,
                    "dtype": dtype,
                    "transformers": transformers.__version__,
                },
                indent=2,
            )
        )
    return out, sha
