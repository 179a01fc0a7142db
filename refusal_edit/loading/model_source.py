"""`ModelSource`: what MODEL resolved to (a directory, a converted GGUF, a recipe, a Hub id) and the local HF
directory that holds it. A module of its own so that both the resolver (`loading.model`) and the GGUF road
(`loading.gguf`) can build one without importing each other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refusal_edit.recipes import Recipe


@dataclass
class ModelSource:
    """Where a model comes from and the local HF directory that holds it."""

    spec: str
    kind: str  # dir | gguf | hub | recipe
    hf_dir: Path
    sha256: str | None = None
    recipe: Recipe | None = None
    origin: Path | None = None  # the file converted into hf_dir (a .gguf), never to be written over

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
