"""`refusal-edit extract MODEL`: generate candidate directions and select the refusal direction."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from refusal_edit.cli.app import app, quiet_libraries
from refusal_edit.cli.options import (
    BATCH_SIZE,
    DEVICE,
    DTYPE,
    FORCE,
    MAX_MEMORY,
    MODEL_HELP,
    OFFLOAD_DIR,
    REPLACE_ANY,
    SYSTEM_PROMPT,
    TEMPLATE,
    TEMPLATE_KWARGS,
)
from refusal_edit.console import err, show


@app.command()
def extract(
    model: str = typer.Argument(..., metavar="MODEL", help=MODEL_HELP),
    out: Path | None = typer.Option(
        None, "--out", help="Artifact directory.", show_default="runs/<model>/direction", metavar="<dir>"
    ),
    dtype: str = DTYPE,
    device: str = DEVICE,
    max_memory: str | None = MAX_MEMORY,
    offload_dir: Path | None = OFFLOAD_DIR,
    system_prompt: str | None = SYSTEM_PROMPT,
    template: Path | None = TEMPLATE,
    template_kwargs: list[str] | None = TEMPLATE_KWARGS,
    harmful: str | None = typer.Option(
        None,
        help="Harmful prompts: builtin:harmful, a file, or hf:NAME[@SPLIT][#COL].",
        show_default="the recipe's, else builtin:harmful",
    ),
    harmless: str | None = typer.Option(
        None, help="Harmless prompts (same forms).", show_default="the recipe's, else builtin:harmless"
    ),
    n_train: int | None = typer.Option(None, help="Training prompts per side.", show_default="all"),
    n_val: int = typer.Option(32, help="Validation prompts per side for selection."),
    batch_size: str = BATCH_SIZE,
    exhaustive: bool = typer.Option(False, "--exhaustive", help="Score every candidate in full (reference)."),
    top_k: int | None = typer.Option(
        None, help="Candidates scored in full after the proxy ranking.", show_default="8, or the recipe's"
    ),
    kl_threshold: float | None = typer.Option(
        None, help="Discard candidates with KL (nats) above this.", show_default="0.1, or the recipe's"
    ),
    induce_threshold: float | None = typer.Option(
        None, help="Discard candidates whose induce score is below this.", show_default="0.0, or the recipe's"
    ),
    prune_layers: float | None = typer.Option(
        None,
        help="Discard candidates in this last fraction of layers, in [0, 1).",
        show_default="0.2, or the recipe's",
    ),
    refusal_tokens: str | None = typer.Option(
        None, help="Comma-separated refusal starts.", show_default="derived from the model's own refusals"
    ),
    no_filter: bool = typer.Option(False, "--no-filter", help="Keep every training prompt (no refusal filter)."),
    strict: bool = typer.Option(
        False,
        "--strict",
        help="Fail when no candidate passes the filters; without it they are relaxed, and the run says so.",
    ),
    force: bool = FORCE,
    replace_any: bool = REPLACE_ANY,
) -> None:
    """Find the refusal direction: difference in means at every layer and post-instruction position,
    then select by the paper's bypass / induce / KL criteria on validation prompts."""
    quiet_libraries()
    from refusal_edit.prompts.template import parse_template_kwargs
    from refusal_edit.workflows import extraction as workflow

    job = workflow.prepare(
        model,
        out,
        dtype=dtype,
        device=device,
        system_prompt=system_prompt,
        template=template,
        template_kwargs=parse_template_kwargs(template_kwargs),
        harmful=harmful,
        harmless=harmless,
        n_train=n_train,
        n_val=n_val,
        batch_size=batch_size,
        exhaustive=exhaustive,
        refusal_tokens=[t for t in refusal_tokens.split(",") if t] if refusal_tokens else None,
        filter_train=not no_filter,
        selection={
            "kl_threshold": kl_threshold,
            "induce_threshold": induce_threshold,
            "prune_layer_fraction": prune_layers,
            "top_k": top_k,
            "strict": strict or None,
        },
        force=force,
        replace_any=replace_any,
        max_memory=max_memory,
        offload_dir=offload_dir,
    )
    err.print(job.describe(), soft_wrap=True)
    done = job.run()
    sel = done.selection
    table = Table(title=f"selected refusal direction ({sel.method}, {sel.evaluated} candidates scored)")
    for col in ("layer", "position", "token", "bypass", "induce", "KL (nats)", "base harmful", "base harmless"):
        table.add_column(col, justify="right")
    c = sel.chosen
    table.add_row(
        str(c.layer),
        str(c.position),
        repr(done.run["chosen"]["position_token"]),
        f"{c.bypass:.3f}",
        f"{c.induce:.3f}",
        f"{c.kl:.4f}",
        f"{sel.base['harmful_refusal_score']:.3f}",
        f"{sel.base['harmless_refusal_score']:.3f}",
    )
    show(table)
    if sel.details.get("relaxed"):
        from refusal_edit.directions.select import describe_relaxation

        err.print(f"[yellow]note:[/yellow] {describe_relaxation(sel.details['relaxed'])} (recorded in run.json)")
    err.print(f"selection took {sel.seconds:.1f} s; artifacts in {done.out}", soft_wrap=True)
    recipe = job.source.recipe
    known = recipe.result if recipe else {}
    if "layer" in known and "position" in known:
        same = (known["layer"], known["position"]) == (c.layer, c.position)
        err.print(
            f"recipe's measured result: layer {known['layer']}, position {known['position']}"
            + (" (the same candidate)" if same else " (differs: other prompts, settings or library versions)"),
            soft_wrap=True,
        )
