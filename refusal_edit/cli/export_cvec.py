"""`refusal-edit export-cvec DIRECTION --out refusal.gguf`: the direction as a llama.cpp control vector."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from refusal_edit.cli.app import app, examples, flag_names, in_flags, quiet_libraries
from refusal_edit.cli.options import EDIT, FORCE, INPUT, OUTPUT, REPLACE_ANY
from refusal_edit.console import err, show


@app.command(
    "export-cvec",
    short_help="Write a llama.cpp control vector (activation addition at run time).",
    epilog=examples(
        "refusal-edit export-cvec runs/demo/direction --out bypass.gguf --coeff -1 --model model.gguf  # -1: bypass",
        "refusal-edit export-cvec runs/demo/direction --out refusal.gguf --model model.gguf   # +1: induce refusal",
        "llama-cli -m model.gguf --control-vector bypass.gguf  # use it in llama.cpp",
    ),
)
def export_cvec(
    direction: Path = typer.Argument(
        ..., metavar="DIRECTION", help="direction.safetensors written by extract (or its folder)."
    ),
    out: Path = typer.Option(
        ..., "--out", help="Control-vector GGUF to write.", metavar="<file>", rich_help_panel=OUTPUT
    ),
    coeff: float = typer.Option(
        1.0, help="Multiple of the vector baked into the file (+1 induces refusal, -1 bypasses).", rich_help_panel=EDIT
    ),
    layers: str | None = typer.Option(
        None,
        help="HF layers whose input receives the vector: A:B (A..B-1) or one layer; the first possible is 2.",
        show_default="the direction's layer",
        rich_help_panel=EDIT,
    ),
    unit: bool = typer.Option(
        False, "--unit", help="Use the unit direction instead of the raw mean difference.", rich_help_panel=EDIT
    ),
    model: Path | None = typer.Option(
        None,
        "--model",
        help="The GGUF it is for: checks the hidden size and layers.",
        metavar="<file>",
        rich_help_panel=INPUT,
    ),
    force: bool = FORCE,
    replace_any: bool = REPLACE_ANY,
) -> None:
    """Write a llama.cpp control vector (activation addition at run time; it cannot ablate)."""
    quiet_libraries()
    from refusal_edit.workflows.cvec import export_cvec as run

    cv = run(direction, out, coeff=coeff, layers=layers, unit=unit, model=model, force=force, replace_any=replace_any)
    table = Table(title=escape(f"control vector: {out}"))
    for col in ("HF layer (input)", "tensor", "norm"):
        table.add_column(col, justify="right")
    for layer, name in zip(cv.layers, cv.tensors, strict=True):
        table.add_row(str(layer), name, f"{cv.norm:.3f}")
    show(table)
    for note in cv.notes:
        err.print(f"[yellow]warning:[/yellow] {escape(in_flags(note, flag_names(['export-cvec'])))}", soft_wrap=True)
    err.print(
        escape(f"- use: llama-cli -m MODEL.gguf --control-vector {out}  (or --control-vector-scaled {out} S)"),
        soft_wrap=True,
    )
