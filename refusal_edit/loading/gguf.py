"""GGUF input: dequantize once with transformers, cache the result as an ordinary safetensors model.

`save_pretrained` refuses a model loaded from GGUF ("quantized with gguf and is not serializable") until
its quantization config is removed; the cached directory is then a plain HF model that every other part
of the tool (and streaming edits) can read. The cache is keyed by the file's sha256 and the dtype, so a
second load takes seconds instead of the dequantization time. `gguf_model` is the other road: MODEL as the
GGUF file itself, for edits written back to GGUF.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from refusal_edit.checkpoint.atomic import atomic_dir
from refusal_edit.console import console
from refusal_edit.errors import RefusalEditError
from refusal_edit.loading.cache import cache_root, cached_sha256
from refusal_edit.loading.fetch import fetch_recipe
from refusal_edit.loading.model_source import ModelSource
from refusal_edit.recipes import find_recipe, load_recipe

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
    with atomic_dir(out, force=True, replace_any=True) as tmp:  # our own cache folder
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


def gguf_model(spec: str | Path) -> ModelSource:
    """MODEL as a GGUF file to edit in place of its HF conversion: a `.gguf` path, or a recipe (fetched).

    Nothing is dequantized: the GGUF editor reads the file itself. `hf_dir` is the file's folder (a Hub cache
    snapshot there still names the base model); `origin` is the file.
    """
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise RefusalEditError(f"GGUF file not found: {path}")
        return ModelSource(str(spec), "gguf", path.parent, origin=path)
    recipe_path = None if path.is_dir() else find_recipe(str(spec))
    if recipe_path is not None:
        recipe = load_recipe(recipe_path)
        gguf_file = fetch_recipe(recipe)
        if gguf_file.suffix.lower() == ".gguf":
            return ModelSource(str(spec), "recipe", gguf_file.parent, recipe=recipe, origin=gguf_file)
    raise RefusalEditError(
        f"a GGUF `out` needs a GGUF `model` (a .gguf file or a recipe that fetches one), got {spec}; for a "
        "safetensors model write a directory, or convert it with llama.cpp's convert_hf_to_gguf.py first"
    )
