"""`refusal-edit extract MODEL`: generate candidate directions and select the refusal direction."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

import refusal_edit.cli.options as opt
from refusal_edit.cli.app import app, examples, quiet_libraries
from refusal_edit.console import err, show


@app.command(
    short_help="Find the refusal direction of MODEL and save it with its provenance.",
    epilog=examples(
        "refusal-edit extract qwen2.5-coder-0.5b-instruct  # the demo model: ~2.5 min on 2 CPU cores",
        "refusal-edit extract ~/models/Qwen3-4B --template-kwargs enable_thinking=false --out runs/qwen3/direction  "
        "# a thinking model, without its reasoning block",
        "refusal-edit extract MODEL --harmful mine.txt --harmless theirs.jsonl --device auto  "
        "# your own prompts; layers over GPUs, CPU and disk",
    ),
)
def extract(
    model: str = typer.Argument(..., metavar="MODEL", help=opt.MODEL_HELP),
    out: Path | None = opt.optional(
        "--out", "Artifact directory.", "runs/<model>/direction", "<dir>", panel=opt.OUTPUT
    ),
    dtype: str = opt.DTYPE,
    device: str = opt.DEVICE,
    max_memory: str | None = opt.MAX_MEMORY,
    offload_dir: Path | None = opt.OFFLOAD_DIR,
    load_in: str | None = opt.LOAD_IN,
    system_prompt: str | None = opt.SYSTEM_PROMPT,
    template: Path | None = opt.TEMPLATE,
    template_kwargs: list[str] | None = opt.TEMPLATE_KWARGS,
    harmful: str | None = opt.prompts("Harmful", "the recipe's, else builtin:harmful", opt.SPLIT_NOTE),
    harmless: str | None = opt.prompts("Harmless", "the recipe's, else builtin:harmless", opt.SPLIT_NOTE),
    n_train: int | None = typer.Option(
        None, help="Training prompts per side.", show_default="all", rich_help_panel=opt.INPUT
    ),
    n_val: int = typer.Option(32, help="Validation prompts per side for selection.", rich_help_panel=opt.SEARCH),
    batch_size: str = opt.BATCH_SIZE,
    exhaustive: bool = opt.switch("--exhaustive", "Score every candidate in full (reference).", panel=opt.SEARCH),
    top_k: int | None = typer.Option(
        None,
        help="Candidates scored in full after the proxy ranking.",
        show_default="8, or the recipe's",
        rich_help_panel=opt.SEARCH,
    ),
    kl_threshold: float | None = typer.Option(
        None,
        help="Discard candidates with KL (nats) above this.",
        show_default="0.1, or the recipe's",
        rich_help_panel=opt.SEARCH,
    ),
    induce_threshold: float | None = typer.Option(
        None,
        help="Discard candidates whose induce score is below this.",
        show_default="0.0, or the recipe's",
        rich_help_panel=opt.SEARCH,
    ),
    prune_layers: float | None = typer.Option(
        None,
        help="Discard candidates in this last fraction of layers, in [0, 1).",
        show_default="0.2, or the recipe's",
        rich_help_panel=opt.SEARCH,
    ),
    refusal_tokens: str | None = typer.Option(
        None,
        help="Comma-separated refusal starts.",
        show_default="derived from the model's own refusals",
        rich_help_panel=opt.SEARCH,
    ),
    no_filter: bool = opt.switch("--no-filter", "Keep every training prompt (no refusal filter).", panel=opt.SEARCH),
    strict: bool = opt.switch(
        "--strict",
        "Fail when no candidate passes the filters; without it they are relaxed, and the run says so.",
        panel=opt.SEARCH,
    ),
    force: bool = opt.FORCE,
    replace_any: bool = opt.REPLACE_ANY,
) -> None:
    """Find the refusal direction: difference in means at every layer and post-instruction position,
    then select by the paper's bypass / induce / KL criteria on validation prompts."""
    quiet_libraries()
    from refusal_edit.workflows import extraction as workflow

    job = workflow.prepare(
        model,
        out,
        harmful=harmful,
        harmless=harmless,
        **opt.chat(system_prompt, template),
        template_kwargs=template_kwargs,
        **opt.placement(dtype, device, max_memory, offload_dir),
        load_in=load_in,
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
    )
    err.print(job.describe(), soft_wrap=True)
    for line in job.split_notes():
        err.print(escape(line), soft_wrap=True)
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
    if done.relaxation is not None:
        err.print(f"[yellow]note:[/yellow] {done.relaxation} (recorded in run.json)")
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
