"""`refusal-edit orthogonalize MODEL --direction D --out DIR`: the permanent weight edit."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from refusal_edit.cli.app import app, examples, flag_names, in_flags, quiet_libraries
from refusal_edit.cli.options import (
    BASIS,
    COEFF,
    EDIT,
    FORCE,
    INPUT,
    LAYER,
    LAYERS,
    MODE,
    MODEL_HELP,
    OUTPUT,
    PER_LAYER,
    PRESERVE_NORM,
    PROJECTED,
    RANK,
    REPLACE_ANY,
    SITE,
    SPEC,
    UNIT,
    WEIGHT,
    edit_options,
    optional,
    switch,
)
from refusal_edit.console import err, show


@app.command(
    short_help="Write the edit: a standalone checkpoint (or GGUF file) with the direction removed.",
    epilog=examples(
        "refusal-edit orthogonalize qwen2.5-coder-0.5b-instruct --direction runs/demo/direction "
        "--out runs/demo/abliterated  # the paper's edit",
        "refusal-edit orthogonalize MODEL --spec runs/demo/tune/front.json --out edited   # tune's pick",
        "refusal-edit orthogonalize model.gguf --direction D --out edited.gguf           # GGUF in, GGUF out",
        "refusal-edit orthogonalize MODEL --direction D --plan-only                      # what would change",
    ),
)
def orthogonalize(
    model: str = typer.Argument(..., metavar="MODEL", help=MODEL_HELP),
    direction: Path | None = optional(
        "--direction",
        "direction.safetensors written by extract (or its folder).",
        "the one --spec was tuned with",
        panel=INPUT,
    ),
    spec: str | None = SPEC,
    layers: str | None = LAYERS,
    weight: float | None = WEIGHT,
    per_layer: bool = PER_LAYER,
    projected: bool = PROJECTED,
    rank: int = RANK,
    basis: str = BASIS,
    preserve_norm: bool = PRESERVE_NORM,
    out: Path | None = optional(
        "--out",
        "Output directory; or EDITED.gguf for a GGUF MODEL (edited in its own quant types). Must not exist "
        "unless --force.",
        metavar="<dir|.gguf>",
        panel=OUTPUT,
    ),
    plan_only: bool = switch(
        "--plan-only", "Print every tensor the edit would change, and how; write nothing.", panel=OUTPUT
    ),
    format: str | None = typer.Option(
        None,
        "--format",
        help="safetensors|gguf|peft|gguf-lora: peft writes a PEFT LoRA adapter folder (megabytes), gguf-lora a "
        "llama.cpp LoRA (llama.cpp --lora) for a GGUF MODEL, or for an HF MODEL as llama.cpp converts it; both "
        "equal the weight edit.",
        show_default="from --out: .gguf is gguf, else safetensors",
        metavar="<format>",
        rich_help_panel=OUTPUT,
    ),
    mode: str = MODE,
    coeff: float = COEFF,
    layer: int | None = LAYER,
    site: str | None = SITE,
    unit: bool = UNIT,
    dtype: str = typer.Option("keep", help="Output dtype: keep|bfloat16|float16|float32.", rich_help_panel=OUTPUT),
    max_shard_size: str | None = typer.Option(
        None, help="Reshard the output (e.g. 5GB, 500MB).", show_default="mirror the input", rich_help_panel=OUTPUT
    ),
    keep_tied: bool = switch(
        "--keep-tied", "Keep tied embeddings (smaller, approximate); by default they are untied (exact).", panel=EDIT
    ),
    base_model: str | None = typer.Option(
        None,
        help="Hub id (ORG/NAME) of the base model, for the model card.",
        show_default="the recipe's, the Hub id, or the edited input's base model",
        rich_help_panel=OUTPUT,
    ),
    force: bool = FORCE,
    replace_any: bool = REPLACE_ANY,
    allow_nonfinite: bool = switch(
        "--allow-nonfinite",
        "Write NaN/inf values that the edit or the dtype cast produced (with a warning) instead of failing.",
        panel=OUTPUT,
    ),
    allow_foreign_direction: bool = switch(
        "--allow-foreign-direction",
        "Apply a direction extracted from another model (an error otherwise); the record and card say so.",
        panel=INPUT,
    ),
) -> None:
    """Write a standalone safetensors model with the direction removed (or a bias baked in)."""
    quiet_libraries()
    from refusal_edit.workflows import editing as workflow
    from refusal_edit.workflows.planning import edit_from_options

    edit = edit_from_options(**edit_options(locals()))
    if plan_only:
        from refusal_edit.cli.archs import plan_summary, plan_table

        job, rows = workflow.preview(model, direction, edit, keep_tied, allow_foreign_direction)
        show(plan_table(job.plan, rows, f"{job.edit.mode}: {job.source.name} (plan only, nothing written)"))
        show(plan_summary(rows))
        if job.variant is not None:
            err.print(f"- edit: {escape(job.variant)}", soft_wrap=True)
        for note in job.plan.notes:
            err.print(f"- {escape(note)}", soft_wrap=True)
        return
    result = workflow.orthogonalize(
        model,
        direction,
        out,
        edit,
        dtype=dtype,
        max_shard_size=max_shard_size,
        force=force,
        keep_tied=keep_tied,
        base_model=base_model,
        replace_any=replace_any,
        allow_nonfinite=allow_nonfinite,
        allow_foreign_direction=allow_foreign_direction,
        format=format,
    )
    w = result.write
    table = Table(title=escape(f"{result.record.mode if result.record else mode}: {w.out}"))
    for col in ("tensors edited", "copied", "created", "size", "seconds"):
        table.add_column(col, justify="right")
    size = f"{w.bytes_written / 1e9:.2f} GB" if w.bytes_written >= 1e8 else f"{w.bytes_written / 1e3:.0f} KB"
    table.add_row(str(w.edited), str(w.copied), str(w.created), size, f"{w.seconds:.1f}")
    show(table)
    if result.variant is not None:
        err.print(f"- edit: {escape(result.variant)}", soft_wrap=True)
    for note in result.plan.notes:
        err.print(f"- {escape(note)}", soft_wrap=True)
    names = flag_names(["orthogonalize"])
    for warning in result.warnings:
        err.print(f"[yellow]warning:[/yellow] {escape(in_flags(warning, names))}", soft_wrap=True)
