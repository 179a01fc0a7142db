"""Resolve what the user called MODEL (directory, .gguf file, recipe, Hub id) and load it.

Every source ends up as a local HF directory with safetensors weights (`ModelSource.hf_dir`), which is
what the streaming weight edit reads; `load_model` instantiates it for extraction and evaluation.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import refusal_edit.loading.placement as placement
from refusal_edit.arch import stock_model_class
from refusal_edit.checkpoint.layout import TOKENIZER_FILES
from refusal_edit.console import err
from refusal_edit.derive import resolve_spec
from refusal_edit.errors import RefusalEditError
from refusal_edit.loading.devices import resolve_device
from refusal_edit.loading.fetch import fetch_recipe
from refusal_edit.loading.gguf import convert_gguf
from refusal_edit.loading.model_source import ModelSource
from refusal_edit.loading.quantize import check_load_in, describe, quantization_config
from refusal_edit.recipes import Recipe, find_recipe, load_recipe, recipe_not_found

LOAD_DTYPES = ("auto", "float32", "bfloat16", "float16")  # what a model is loaded in (auto: see _torch_dtype)


def _check_hf_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise RefusalEditError(f"not a model directory (no config.json): {path}")
    if not any(path.glob("*.safetensors")):
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise RefusalEditError(f"{path} has only pickle (.bin/.pt) weights; refusal-edit reads safetensors only")
        raise RefusalEditError(f"no safetensors weights in {path}")


def conversion_dtype(dtype: str, recipe: Recipe | None = None) -> str:
    """The dtype a GGUF file is dequantized to: the one asked for, else the recipe's, else float32."""
    if dtype == "auto" and recipe is not None:
        dtype = recipe.dtype
    if dtype not in LOAD_DTYPES:
        raise RefusalEditError(f"unknown `dtype` {dtype!r} ({', '.join(LOAD_DTYPES)})")
    return "float32" if dtype == "auto" else dtype


def _is_direction_file(path: Path) -> bool:
    """A safetensors file with a `direction` tensor (what extract writes), not model weights."""
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            return "direction" in fh.keys()
    except Exception:
        return False


def resolve_source(spec: str, dtype: str = "auto") -> ModelSource:
    """Turn MODEL into a local HF directory (converting GGUF, fetching recipes, downloading Hub ids)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        _check_hf_dir(path)
        return ModelSource(spec, "dir", path)
    if _is_direction_file(path):
        raise RefusalEditError(f"{spec} is a direction file, not a model: pass it as `direction`")
    if path.suffix == ".gguf":
        hf_dir, sha = convert_gguf(path, conversion_dtype(dtype))
        return ModelSource(spec, "gguf", hf_dir, sha, origin=path)
    recipe_path = find_recipe(spec)
    if recipe_path is not None:
        recipe = load_recipe(recipe_path)
        gguf_file = fetch_recipe(recipe)
        hf_dir, sha = convert_gguf(gguf_file, conversion_dtype(dtype, recipe))
        return ModelSource(spec, "recipe", hf_dir, sha, recipe, origin=gguf_file)
    if path.exists():
        raise RefusalEditError(f"not a model directory, .gguf file or recipe: {spec}")
    local_parent = path.parent if path.parent != Path(".") else None
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not (local_parent and local_parent.is_dir()):
        return ModelSource(spec, "hub", _download(spec))
    if local_parent is not None and local_parent.is_dir():  # a path: never asked of the Hub
        raise RefusalEditError(f"model not found: no folder or file {spec}{_close_names(path)}")
    if "/" not in spec and "\\" not in spec and path.suffix not in (".gguf", ".toml"):
        # A bare name can only have meant a recipe: name the close ones.
        raise RefusalEditError(
            f"model not found: {spec} (not a directory, .gguf file or Hub id); {recipe_not_found(spec)}"
        )
    raise RefusalEditError(f"model not found: {spec} (a directory, a .gguf file, a recipe or a Hub id)")


def _close_names(path: Path) -> str:
    """`; did you mean ...?` with the entries of `path`'s folder whose names are close to its name, or ''."""
    import difflib

    try:
        names = [p.name for p in path.parent.iterdir()]
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, names, n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(str(path.parent / c) for c in close)}?" if close else ""


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "tokenizer*"]
    try:
        local = Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:
        if _no_network(exc):
            raise RefusalEditError(
                f"cannot download {repo_id} from the Hub: no network: pass a local directory, a .gguf file or a recipe"
            ) from exc
        first = (str(exc).strip().splitlines() or [""])[0]
        raise RefusalEditError(f"cannot download {repo_id} from the Hub: {type(exc).__name__}: {first}") from exc
    _check_hf_dir(local)
    return local


def _no_network(exc: BaseException) -> bool:
    """Offline mode, or no connection (the client then finds no cached copy either)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OfflineModeIsEnabled | LocalEntryNotFoundError | ConnectionError | TimeoutError):
            return True
        if "connect" in type(exc).__name__.lower() or "timeout" in type(exc).__name__.lower():
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return bool(constants.HF_HUB_OFFLINE)


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    source: ModelSource
    dtype: str
    device: str  # cpu | cuda | mps | auto (spread by accelerate: see `placement`)
    placement: str | None = None  # where the layers went, e.g. "layers 0-9 cpu, 10-23 disk (...)"
    load_in: str | None = None  # 4bit | 8bit: linear layers quantized by bitsandbytes (`quantize`)
    # Greedy replies this model has given, by what they depend on (prompts, length): `evaluate` generates a base
    # model's replies once for every edit compared with it (`evaluation.comparison.compare`).
    replies: dict[str, Any] = field(default_factory=dict, repr=False)


def _torch_dtype(dtype: str, device: str, config: dict[str, Any], hf_dir: Path | None = None) -> tuple[Any, str]:
    """The load dtype and, when `dtype` auto chose by size, why (see `placement.choose_dtype`)."""
    import torch

    if dtype not in LOAD_DTYPES:
        raise RefusalEditError(f"unknown `dtype` {dtype!r} ({', '.join(LOAD_DTYPES)})")
    if dtype != "auto" or device == "cuda":
        return placement.choose_dtype(dtype, device, config, 0, 0)
    if hf_dir is None:
        return torch.float32, ""
    import psutil

    try:
        f32 = placement.model_bytes(placement._empty_model(hf_dir, torch.float32), torch.float32)
    except Exception:  # sizing is advisory: load as before (float32 on the CPU)
        return torch.float32, ""
    return placement.choose_dtype(dtype, device, config, f32, psutil.virtual_memory().available)


def load_tokenizer(hf_dir: Path):
    """The model's tokenizer (left padding); a folder without one is one line naming the files it lacks."""
    from transformers import AutoTokenizer

    hf_dir = Path(hf_dir)
    if not any((hf_dir / n).is_file() for n in TOKENIZER_FILES) and not any(hf_dir.glob("*.tiktoken")):
        raise RefusalEditError(
            f"no tokenizer in {hf_dir}: a model folder needs tokenizer.json (or tokenizer.model, or vocab.json "
            "with merges.txt) and tokenizer_config.json beside config.json; copy them from the base model"
        )
    try:
        tok = AutoTokenizer.from_pretrained(str(hf_dir))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RefusalEditError(f"cannot load the tokenizer from {hf_dir}: {first}") from exc
    if len(tok) == 0:
        raise RefusalEditError(f"the tokenizer in {hf_dir} has an empty vocabulary")
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def context_length(lm: LoadedModel) -> int | None:
    """The longest sequence the model's positions cover (its config's max_position_embeddings), if it says."""
    value = getattr(lm.model.config.get_text_config(), "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def load_model(
    source: ModelSource | str,
    dtype: str = "auto",
    device: str = "cpu",
    tokenizer: bool = True,
    max_memory: str | dict[Any, Any] | None = None,
    offload_dir: str | Path | None = None,
    load_in: str | None = None,
) -> LoadedModel:
    """Instantiate a model in eval mode (stock transformers, never trust_remote_code).

    `device` cpu, cuda or mps: the whole model there. `device` auto picks CUDA, then MPS, then the CPU
    (`devices.resolve_device`, said on stderr); on CUDA or the CPU accelerate then places the layers over
    the GPUs there are, then the CPU, then disk, within `max_memory` (`placement.parse_max_memory`; default:
    the free memory); disk-offloaded weights are read from the checkpoint's own files, or written under
    `offload_dir` (default `<cache>/offload`) when transformers converts them. Says in one line where the
    layers went.
    `load_in` 4bit or 8bit: bitsandbytes quantizes the linear layers while loading, the whole model on the
    picked device (`quantize`: what it is for and which commands take it).
    """
    src = source if isinstance(source, ModelSource) else resolve_source(source, dtype)
    config = src.config()
    resolve_spec(config)  # unsupported architectures fail (derived ones are derived) before any weights are read
    placed = resolve_device(device)
    if check_load_in(load_in) and (max_memory is not None or offload_dir is not None):
        raise RefusalEditError("`max_memory` and `offload_dir` do not apply with `load_in`: it loads the model whole")
    if not placed.spread and (max_memory is not None or offload_dir is not None):
        where = " on CUDA or the CPU" if placed.requested == "auto" else ""
        raise RefusalEditError(f"`max_memory` and `offload_dir` apply to `device` auto{where}")
    if load_in:
        placed = replace(placed, spread=False)  # bitsandbytes layers stay on the device they were quantized on
    limits = placement.parse_max_memory(max_memory)
    kwargs: dict[str, Any] = {"use_safetensors": True}
    unread: frozenset[str] = frozenset()  # offloaded parameters the loader need not read (`read_without_mmap`)
    if placed.spread:
        if dtype not in LOAD_DTYPES:
            raise RefusalEditError(f"unknown `dtype` {dtype!r} ({', '.join(LOAD_DTYPES)})")
        plan = placement.plan_auto(src.hf_dir, config, dtype, limits, Path(offload_dir) if offload_dir else None)
        torch_dtype, why, unread = plan.dtype, "\n".join(plan.notes), plan.on_disk
        if plan.device_map is not None:
            kwargs["device_map"] = plan.device_map
        if plan.offload_dir is not None:
            folder = placement.offload_folder(plan.offload_dir, src.name.replace("/", "--"))
            kwargs["offload_folder"] = str(folder)
    else:
        torch_dtype, why = _torch_dtype(dtype, placed.kind, config, src.hf_dir)
        if placed.kind != "cpu" or load_in:
            kwargs["device_map"] = placed.kind
        if load_in:
            kwargs["quantization_config"] = quantization_config(load_in, placed.kind, torch_dtype)
    for line in why.splitlines():
        err.print(f"[yellow]note:[/yellow] {line}", soft_wrap=True)
    tok = load_tokenizer(src.hf_dir) if tokenizer else None  # a missing tokenizer fails before the weights load
    chatter = logging.getLogger("accelerate.big_modeling")  # "offloaded to the disk": the placement line says it
    level = chatter.level
    chatter.setLevel(logging.ERROR)
    to_disk = "disk" in (kwargs.get("device_map") or {}).values() if placed.spread else False
    try:
        with placement.read_without_mmap(to_disk, unread, torch_dtype):
            model = stock_model_class(config).from_pretrained(str(src.hf_dir), dtype=torch_dtype, **kwargs)
    except Exception as exc:
        if "offload_folder" in kwargs:
            shutil.rmtree(kwargs["offload_folder"], ignore_errors=True)
        raise RefusalEditError(f"cannot load the model from {src.hf_dir}: {type(exc).__name__}: {exc}") from exc
    finally:
        chatter.setLevel(level)
    model.eval()
    if "offload_folder" in kwargs:
        placement.remove_with(model, Path(kwargs["offload_folder"]))
    from refusal_edit.offload import describe_placement, dispatched, input_device, read_offloaded_in_chunks

    if to_disk:
        read_offloaded_in_chunks(model)  # each offloaded module then costs its own size while it runs

    try:
        where = describe_placement(model)
    except Exception:  # a model the table cannot take apart still runs: say where its first weight is
        where = f"on {input_device(model)}"
    dev = placed.kind
    said = [placed.said] if placed.said else []
    if load_in:
        said.append(describe(load_in, torch_dtype))
    if placed.spread:
        said.append(f"placed by accelerate ({str(torch_dtype).removeprefix('torch.')}): {where}")
        dev = "auto" if dispatched(model) else input_device(model).type  # all on one device: a plain model there
    if said:
        err.print("; ".join(said), soft_wrap=True)
    return LoadedModel(model, tok, src, str(torch_dtype).removeprefix("torch."), dev, where, load_in)
