"""Resolve what the user called MODEL (directory, .gguf file, recipe, Hub id) and load it.

Every source ends up as a local HF directory with safetensors weights (`ModelSource.hf_dir`), which is
what the streaming weight edit reads; `load_model` instantiates it for extraction and evaluation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refusal_edit.errors import RefusalEditError
from refusal_edit.loading.gguf import convert_gguf
from refusal_edit.recipes import Recipe, find_recipe, load_recipe

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda", "auto")


@dataclass
class ModelSource:
    """Where a model comes from and the local HF directory that holds it."""

    spec: str
    kind: str  # dir | gguf | hub | recipe
    hf_dir: Path
    sha256: str | None = None
    recipe: Recipe | None = None

    @property
    def name(self) -> str:
        if self.recipe is not None:
            return self.recipe.name
        if self.kind == "hub":
            return self.spec
        return Path(self.spec.rstrip("/")).name.removesuffix(".gguf")

    def config(self) -> dict[str, Any]:
        return json.loads((self.hf_dir / "config.json").read_text())

    def describe(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "kind": self.kind,
            "name": self.name,
            "hf_dir": str(self.hf_dir),
            "sha256": self.sha256,
            "recipe": str(self.recipe.path) if self.recipe else None,
        }


def _check_hf_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise RefusalEditError(f"not a model directory (no config.json): {path}")
    if not any(path.glob("*.safetensors")):
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise RefusalEditError(f"{path} has only pickle (.bin/.pt) weights; refusal-edit reads safetensors only")
        raise RefusalEditError(f"no safetensors weights in {path}")


def _gguf_dtype(dtype: str) -> str:
    return "float32" if dtype == "auto" else dtype


def resolve_source(spec: str, dtype: str = "auto") -> ModelSource:
    """Turn MODEL into a local HF directory (converting GGUF, fetching recipes, downloading Hub ids)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        _check_hf_dir(path)
        return ModelSource(spec, "dir", path)
    if path.suffix == ".gguf":
        hf_dir, sha = convert_gguf(path, _gguf_dtype(dtype))
        return ModelSource(spec, "gguf", hf_dir, sha)
    recipe_path = find_recipe(spec)
    if recipe_path is not None:
        from refusal_edit.loading.fetch import fetch_recipe

        recipe = load_recipe(recipe_path)
        gguf_file = fetch_recipe(recipe)
        hf_dir, sha = convert_gguf(gguf_file, _gguf_dtype(dtype if dtype != "auto" else recipe.dtype))
        return ModelSource(spec, "recipe", hf_dir, sha, recipe)
    if path.exists():
        raise RefusalEditError(f"not a model directory, .gguf file or recipe: {spec}")
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return ModelSource(spec, "hub", _download(spec))
    raise RefusalEditError(f"model not found: {spec} (a directory, a .gguf file, a recipe or a Hub id)")


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "tokenizer*"]
    try:
        local = Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:
        raise RefusalEditError(f"cannot download {repo_id} from the Hub: {type(exc).__name__}: {exc}") from exc
    _check_hf_dir(local)
    return local


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    source: ModelSource
    dtype: str
    device: str


def _torch_dtype(dtype: str, device: str, config: dict[str, Any]):
    import torch

    if dtype not in DTYPES:
        raise RefusalEditError(f"unknown dtype {dtype!r} ({', '.join(DTYPES)})")
    if dtype == "auto":
        # On CPU, float32 is both faster and exact; on GPU use the checkpoint's own dtype.
        if device == "cpu":
            return torch.float32
        stored = config.get("dtype") or config.get("torch_dtype") or "float32"
        return getattr(torch, stored, torch.float32)
    return getattr(torch, dtype)


def _device(device: str) -> str:
    import torch

    if device not in DEVICES:
        raise RefusalEditError(f"unknown device {device!r} ({', '.join(DEVICES)})")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RefusalEditError("--device cuda was requested but no CUDA device is available")
    return device


def load_tokenizer(hf_dir: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(hf_dir))
    except Exception as exc:
        raise RefusalEditError(f"cannot load the tokenizer from {hf_dir}: {exc}") from exc
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    source: ModelSource | str, dtype: str = "auto", device: str = "cpu", tokenizer: bool = True
) -> LoadedModel:
    """Instantiate a model in eval mode (stock transformers, never trust_remote_code)."""
    from transformers import AutoModelForCausalLM

    from refusal_edit.arch import get_spec

    src = source if isinstance(source, ModelSource) else resolve_source(source, dtype)
    config = src.config()
    get_spec(config.get("model_type"))  # unsupported architectures fail before any weights are read
    dev = _device(device)
    torch_dtype = _torch_dtype(dtype, dev, config)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "use_safetensors": True}
    if dev == "cuda":
        kwargs["device_map"] = "auto" if device == "auto" else "cuda"
    try:
        model = AutoModelForCausalLM.from_pretrained(str(src.hf_dir), **kwargs)
    except Exception as exc:
        raise RefusalEditError(f"cannot load the model from {src.hf_dir}: {type(exc).__name__}: {exc}") from exc
    model.eval()
    tok = load_tokenizer(src.hf_dir) if tokenizer else None
    return LoadedModel(model, tok, src, str(torch_dtype).removeprefix("torch."), dev)
