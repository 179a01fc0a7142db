"""`refusal-edit recipes`: the recipes there are, where their weights come from, and which are fetched."""

from __future__ import annotations

from dataclasses import dataclass

from refusal_edit.errors import RefusalEditError
from refusal_edit.recipes import Recipe, available_recipes, load_recipe


@dataclass
class RecipeEntry:
    """One recipe found by name: the recipe (None if it does not load), whether its weights are in the cache,
    and what is wrong with it (a broken recipe is listed, not fatal to the listing)."""

    name: str
    recipe: Recipe | None
    fetched: bool = False
    problem: str | None = None
    size: int | None = None  # bytes of the weights: the recipe's figure, else the fetched file's


def list_recipes() -> list[RecipeEntry]:
    """Every recipe `MODEL` can name, in name order."""
    from refusal_edit.loading.fetch import fetched_path

    entries = []
    for name in available_recipes():
        try:
            recipe = load_recipe(name)
        except RefusalEditError as exc:
            entries.append(RecipeEntry(name, None, problem=str(exc)))
            continue
        path = fetched_path(recipe) if recipe.source.get("kind") == "pypi-gguf" else None
        fetched = path is not None and path.is_file()
        size = recipe.size or (path.stat().st_size if fetched and path is not None else None)
        entries.append(RecipeEntry(name, recipe, fetched, size=size))
    return entries
