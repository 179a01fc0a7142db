"""The files of an HF checkpoint directory: weight shards, index, config and everything else."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refusal_edit.checkpoint.safetensors_io import ShardHeader, TensorInfo, read_header
from refusal_edit.errors import RefusalEditError

INDEX = "model.safetensors.index.json"
# Weight files in other formats would ship the *unedited* weights next to the edited ones: never copied.
FOREIGN_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")


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
        """(files to copy byte for byte, files deliberately skipped) at the top level."""
        shard_names = {s.path.name for s in self.shards}
        copy: list[Path] = []
        skipped: list[Path] = []
        for p in sorted(self.root.iterdir()):
            if p.name in shard_names or p.name == INDEX:
                continue
            if p.is_dir() or p.suffix in FOREIGN_WEIGHTS or p.name.endswith(".safetensors"):
                skipped.append(p)
            elif not p.name.startswith("."):
                copy.append(p)
        return copy, skipped


def open_checkpoint(root: Path) -> Checkpoint:
    """Validate the directory (config, index, every shard header) before anything is written."""
    root = Path(root)
    if not root.is_dir():
        raise RefusalEditError(f"model directory not found: {root}")
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise RefusalEditError(f"not a model directory (no config.json): {root}")
    try:
        config = json.loads(cfg_path.read_text())
    except ValueError as exc:
        raise RefusalEditError(f"config.json is not valid JSON: {exc}") from exc
    index = None
    if (root / INDEX).is_file():
        try:
            index = json.loads((root / INDEX).read_text())
            weight_map: dict[str, str] = index["weight_map"]
        except (ValueError, KeyError) as exc:
            raise RefusalEditError(f"{INDEX} is not a valid index: {exc}") from exc
        names = list(dict.fromkeys(weight_map.values()))
        missing = [n for n in names if not (root / n).is_file()]
        if missing:
            raise RefusalEditError(f"missing shard {missing[0]} (listed in {INDEX})")
        shards = [read_header(root / n) for n in names]
        by_file = {s.path.name: s for s in shards}
        for tensor, fname in weight_map.items():
            if tensor not in by_file[fname].tensors:
                raise RefusalEditError(f"corrupt checkpoint: {tensor} is not in {fname} as the index says")
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
