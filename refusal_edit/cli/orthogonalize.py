"""`refusal-edit orthogonalize MODEL --direction D --out DIR`: the permanent weight edit."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from refusal_edit.cli.app import app, quiet_libraries
from refusal_edit.console import console


@app.command()
def orthogonalize(
    model: str = typer.Argument(..., help="HF directory (or .gguf / recipe / Hub id, resolved to one)."),
    direction: Path = typer.Option(..., "--direction", help="direction.safetensors written by extract."),
    out: Path = typer.Option(..., "--out", help="Output directory (must not exist unless --force)."),
    mode: str = typer.Option("ablate", help="ablate: orthogonalize every residual writer; add: bake a bias."),
    coeff: float = typer.Option(1.0, help="add: multiple of the vector (+1 induces refusal, -1 bypasses)."),
    layer: int | None = typer.Option(None, help="add: layer (default: the direction's layer)."),
    site: str = typer.Option("input", help="add: input (of --layer) or attn (after --layer's attention)."),
    unit: bool = typer.Option(False, "--unit", help="add: add the unit direction instead of mean_diff."),
    dtype: str = typer.Option("keep", help="Output dtype: keep|bfloat16|float16|float32."),
    max_shard_size: str | None = typer.Option(None, help="Reshard the output (e.g. 5GB); default mirrors input."),
    keep_tied: bool = typer.Option(
        False, "--keep-tied", help="Keep tied embeddings (smaller, approximate); default unties (exact)."
    ),
    base_model: str | None = typer.Option(None, help="Hub id of the base model for the model card."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out."),
) -> None:
    """Write a standalone safetensors model with the direction removed (or a bias baked in)."""
    quiet_libraries()
    from refusal_edit.directions.artifacts import load_direction
    from refusal_edit.edits import orthogonalize as run
    from refusal_edit.loading import resolve_source

    d = load_direction(direction)
    source = resolve_source(model)
    base = base_model
    if base is None and source.recipe is not None:
        base = source.recipe.source.get("base_model")
    if base is None and source.kind == "hub":
        base = source.spec
    result = run(
        source.hf_dir,
        d,
        out,
        mode=mode,  # type: ignore[arg-type]
        coeff=coeff,
        layer=layer,
        site=site,
        unit=unit,
        dtype=dtype,
        max_shard_size=max_shard_size,
        force=force,
        keep_tied=keep_tied,
        base_model=base or source.name,
    )
    w = result.write
    table = Table(title=f"{mode}: {out}")
    table.add_column("tensors edited", justify="right")
    table.add_column("copied", justify="right")
    table.add_column("created", justify="right")
    table.add_column("size", justify="right")
    table.add_column("seconds", justify="right")
    table.add_row(str(w.edited), str(w.copied), str(w.created), f"{w.bytes_written / 1e9:.2f} GB", f"{w.seconds:.1f}")
    console.print(table)
    for note in result.plan.notes:
        console.print(f"- {note}")
