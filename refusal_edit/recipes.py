"""Recipes: TOML files that describe a known model (source, dtype, system prompt, prompt sets, selection
overrides) and the result measured with it.

A recipe is referred to by path (`recipes/foo.toml`) or by name (`foo`), looked up in `./recipes` and in
the `recipes/` folder of a source checkout.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refusal_edit.errors import RefusalEditError


@dataclass
class Recipe:
    name: str
    path: Path
    description: str = ""
    source: dict[str, Any] = field(default_factory=dict)
    dtype: str = "auto"
    system_prompt: str | None = None
    harmful: str = "builtin:harmful"
    harmless: str = "builtin:harmless"
    select: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)


def recipe_dirs() -> list[Path]:
    return [Path.cwd() / "recipes", Path(__file__).resolve().parent.parent / "recipes"]


def find_recipe(name: str) -> Path | None:
    """Path of the recipe `name` (a .toml path or a bare name), or None."""
    p = Path(name)
    if p.suffix == ".toml":
        return p if p.is_file() else None
    if "/" in name or "\\" in name:
        return None
    for d in recipe_dirs():
        candidate = d / f"{name}.toml"
        if candidate.is_file():
            return candidate
    return None


def load_recipe(name_or_path: str | Path) -> Recipe:
    path = find_recipe(str(name_or_path))
    if path is None:
        raise RefusalEditError(f"recipe not found: {name_or_path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise RefusalEditError(f"cannot read recipe {path}: {exc}") from exc
    model = data.get("model", {})
    prompts = data.get("prompts", {})
    system = model.get("system_prompt")
    return Recipe(
        name=data.get("name", path.stem),
        path=path,
        description=data.get("description", ""),
        source=data.get("source", {}),
        dtype=model.get("dtype", "auto"),
        system_prompt=system if system else None,
        harmful=prompts.get("harmful", "builtin:harmful"),
        harmless=prompts.get("harmless", "builtin:harmless"),
        select=data.get("select", {}),
        result=data.get("result", {}),
    )
