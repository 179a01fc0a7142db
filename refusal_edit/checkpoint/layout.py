"""The files of an HF checkpoint directory: weight shards, index, config and everything else.

Everything read here may come from someone else's repository, so it is validated before anything is
written: `config.json` and the index must have the shapes transformers expects, shard names in the index
are plain file names inside the directory, every shard is a regular file with a valid header, and no
tensor appears twice.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refusal_edit.checkpoint.safetensors_io import ShardHeader, TensorInfo, read_header
from refusal_edit.errors import RefusalEditError
from refusal_edit.paths import is_within, plain_name

INDEX = "model.safetensors.index.json"
# Any one of these is a tokenizer transformers can load (fast, sentencepiece, BPE, WordPiece, tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "tiktoken.model")
# Weight files in other formats would ship the *unedited* weights next to the edited ones: never copied.
FOREIGN_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
MAX_JSON = 64 << 20  # config and index files are kilobytes; anything this large is not one
# The config values that fix a model's shapes (a direction's source model is identified by them too).
SHAPE_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)
# Config keys that must be non-negative integers when present (the plan computes with them).
INT_KEYS = (
    *SHAPE_KEYS,
    "n_embd",
    "n_layer",
    "n_head",
    "num_experts",
    "num_local_experts",
)


@dataclass
class Checkpoint:
    """A validated safetensors checkpoint directory."""

    root: Path
    shards: list[ShardHeader]  # in index (or name) order
    index: dict[str, Any] | None  # parsed index file, None for a single unindexed file
    config: dict[str, Any]

    def find(self, name: str) -> tuple[ShardHeader, TensorInfo] | None:
        for shard in self.shards:
            info = shard.tensors.get(name)
            if info is not None:
                return shard, info
        return None

    def names(self) -> list[str]:
        return [n for s in self.shards for n in s.tensors]

    def other_files(self) -> tuple[list[Path], list[Path]]:
        """(files to copy byte for byte, files deliberately skipped) at the top level.

        Skipped: folders, weights in other formats, stray safetensors, hidden files, and what `unsafe_files`
        lists.
        """
        copy: list[Path] = []
        skipped: list[Path] = []
        for p, kind in self._classified():
            if kind != "ignore":
                (copy if kind == "copy" else skipped).append(p)
        return copy, skipped

    def unsafe_files(self) -> list[Path]:
        """Top-level files skipped for safety: anything that is not a regular file (FIFOs, devices) and
        symlinks that resolve outside the model folder. A cloned repository with `tokenizer.json ->
        ~/.ssh/id_rsa` must not have that file copied into an output that is then published. Hugging Face
        cache snapshots (symlinks into the repository's `blobs/`) are followed."""
        return [p for p, kind in self._classified() if kind == "unsafe"]

    def _classified(self) -> list[tuple[Path, str]]:
        shard_names = {s.path.name for s in self.shards}
        allowed = [self.root.resolve()]
        if self.root.parent.name == "snapshots":  # huggingface_hub cache layout
            allowed.append((self.root.parent.parent / "blobs").resolve())
        out: list[tuple[Path, str]] = []
        for p in sorted(self.root.iterdir()):
            if p.name in shard_names or p.name == INDEX or p.name.startswith("."):
                kind = "ignore"
            elif p.is_dir() or p.suffix in FOREIGN_WEIGHTS or p.name.endswith(".safetensors"):
                kind = "skip"
            elif not _regular(p) or (p.is_symlink() and not any(is_within(p.resolve(), a) for a in allowed)):
                kind = "unsafe"
            else:
                kind = "copy"
            out.append((p, kind))
        return out

    def input_paths(self) -> list[Path]:
        """Every path this checkpoint is read from (the folder, and where its shards really live)."""
        return [self.root, *(s.path.resolve() for s in self.shards)]


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


def _read_json(path: Path, what: str) -> Any:
    if path.is_dir():
        raise RefusalEditError(f"{what} is a directory, not a file: {path}")
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise RefusalEditError(f"{what} is not a regular file: {path}")
        if st.st_size > MAX_JSON:
            raise RefusalEditError(f"{what} is {st.st_size} bytes, too large to be one: {path}")
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RefusalEditError(f"cannot read {what} {path}: {exc.strerror}") from None
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise RefusalEditError(f"{what} is not valid JSON: {str(exc)[:120]}") from None


def _check_config(config: Any) -> dict[str, Any]:
    if not isinstance(config, dict):
        raise RefusalEditError(f"config.json must hold a JSON object, not a {type(config).__name__}")
    text = config.get("text_config")
    if text is not None and not isinstance(text, dict):
        raise RefusalEditError("config.json: text_config must be an object")
    quant = config.get("quantization_config")
    if quant is not None and not isinstance(quant, dict):
        raise RefusalEditError(f"config.json: quantization_config must be an object, not {quant!r:.40}")
    for where, cfg in (("", config), ("text_config.", text or {})):
        model_type = cfg.get("model_type")
        if model_type is not None and not isinstance(model_type, str):
            raise RefusalEditError(f"config.json: {where}model_type must be a string, not {model_type!r:.40}")
        for key in INT_KEYS:
            value = cfg.get(key)
            if value is not None and not (type(value) is int and value >= 0):
                raise RefusalEditError(f"config.json: {where}{key} must be a non-negative integer, not {value!r:.40}")
    return config


def _check_index(index: Any) -> dict[str, str]:
    if not isinstance(index, dict):
        raise RefusalEditError(f"{INDEX} must hold a JSON object, not a {type(index).__name__}")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise RefusalEditError(f"{INDEX}: weight_map must be an object mapping tensor names to shard files")
    if not weight_map:
        raise RefusalEditError(f"{INDEX}: weight_map lists no tensors")
    metadata = index.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise RefusalEditError(f"{INDEX}: metadata must be an object")
    for tensor, shard in weight_map.items():
        plain_name(shard, f"{INDEX}: the shard of {tensor}")
    return weight_map


def _shard_path(root: Path, name: str) -> Path:
    path = root / name
    if not os.path.lexists(path):
        raise RefusalEditError(f"missing shard {name} (listed in {INDEX})")
    return path


def _check_unique(shards: list[ShardHeader]) -> None:
    seen: dict[str, str] = {}
    for shard in shards:
        for name in shard.tensors:
            if name in seen:
                raise RefusalEditError(
                    f"corrupt checkpoint: tensor {name} is in both {seen[name]} and {shard.path.name}"
                )
            seen[name] = shard.path.name


def read_config(root: Path) -> dict[str, Any]:
    """`root/config.json`, checked: a JSON object whose `text_config` / `quantization_config` are objects,
    `model_type` a string and sizes non-negative integers (what every reader of a config relies on)."""
    cfg_path = Path(root) / "config.json"
    if not os.path.lexists(cfg_path):
        raise RefusalEditError(f"not a model directory (no config.json): {root}")
    return _check_config(_read_json(cfg_path, "config.json"))


def open_checkpoint(root: Path) -> Checkpoint:
    """Validate the directory (config, index, every shard header) before anything is written."""
    root = Path(root)
    if not root.is_dir():
        raise RefusalEditError(f"model directory not found: {root}")
    config = read_config(root)
    index = None
    if os.path.lexists(root / INDEX):
        index = _read_json(root / INDEX, INDEX)
        weight_map = _check_index(index)
        names = list(dict.fromkeys(weight_map.values()))
        shards = [read_header(_shard_path(root, n)) for n in names]
        by_file = {s.path.name: s for s in shards}
        for tensor, fname in weight_map.items():
            if tensor not in by_file[fname].tensors:
                raise RefusalEditError(f"corrupt checkpoint: {tensor} is not in {fname} as the index says")
        _check_unique(shards)
    else:
        files = sorted(root.glob("*.safetensors"))
        if not files:
            if any(root.glob("*.bin")):
                raise RefusalEditError(f"{root} has only pickle (.bin) weights; safetensors are required")
            raise RefusalEditError(f"no safetensors weights in {root}")
        if len(files) > 1:
            raise RefusalEditError(f"{len(files)} safetensors files but no {INDEX} in {root}")
        shards = [read_header(files[0])]
    return Checkpoint(root, shards, index, config)
