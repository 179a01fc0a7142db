"""`refusal-edit tune MODEL --direction D`: the refusal-vs-damage front of the edit variants."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from refusal_edit.cli.app import app, quiet_libraries
from refusal_edit.cli.options import (
    BATCH_SIZE,
    DEVICE,
    DTYPE,
    MAX_MEMORY,
    MODEL_HELP,
    OFFLOAD_DIR,
    SYSTEM_PROMPT,
    TEMPLATE,
    TEMPLATE_KWARGS,
)
from refusal_edit.console import err, show


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


@app.command()
def tune(
    model: str = typer.Argument(..., metavar="MODEL", help=MODEL_HELP),
    direction: Path = typer.Option(
        ..., "--direction", help="direction.safetensors (or its run folder) written by extract.", metavar="<file>"
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Study folder.", show_default="runs/<model>/tune", metavar="<dir>"
    ),
    trials: int = typer.Option(32, help="Optuna trials in all (the seed points included)."),
    confirm: int = typer.Option(4, help="Front points confirmed by greedy generation (plus the paper's edit)."),
    max_kl: float = typer.Option(0.1, help="Pick: fewest refusals with first-token KL (nats) at most this."),
    n_val: int = typer.Option(32, help="Harmful validation prompts whose replies confirm each point."),
    search_prompts: int = typer.Option(16, help="Prompts per side scored in every search trial (and for KL)."),
    max_new_tokens: int = typer.Option(48, help="Greedy tokens per reply (and per KL continuation) when confirming."),
    no_preserve_norm: bool = typer.Option(
        False, "--no-preserve-norm", help="Leave norm-preserving edits out of the search."
    ),
    seed: int = typer.Option(0, help="Sampler seed."),
    harmful: str | None = typer.Option(None, help="Harmful prompts (val split used).", show_default="the recipe's"),
    harmless: str | None = typer.Option(None, help="Harmless prompts (val split used).", show_default="the recipe's"),
    system_prompt: str | None = SYSTEM_PROMPT,
    template: Path | None = TEMPLATE,
    template_kwargs: list[str] | None = TEMPLATE_KWARGS,
    batch_size: str = BATCH_SIZE,
    dtype: str = DTYPE,
    device: str = DEVICE,
    max_memory: str | None = MAX_MEMORY,
    offload_dir: Path | None = OFFLOAD_DIR,
    resume: bool = typer.Option(False, "--resume", help="Continue the study in --out."),
    force: bool = typer.Option(False, "--force", help="Start over in --out (removes only a previous study's files)."),
) -> None:
    """Search edit variants (per-layer strength, per-layer / interpolated / projected directions, norm
    preservation) with Optuna on cheap proxies, confirm the best points by generation, and pick one.
    Write it with `refusal-edit orthogonalize MODEL --spec DIR/front.json[#ID]`."""
    quiet_libraries()
    from refusal_edit.forward import parse_batch_size
    from refusal_edit.prompts.template import parse_template_kwargs
    from refusal_edit.tuning import TuneSettings
    from refusal_edit.workflows.tune import tune as workflow

    checks = (
        ("trials", trials),
        ("confirm", confirm),
        ("max_new_tokens", max_new_tokens),
        ("search_prompts", search_prompts),
    )
    rows = parse_batch_size(batch_size)  # auto: chosen once the model is loaded
    if rows != "auto":
        checks = (*checks, ("batch_size", int(rows)))
    for name, value, low in ((n, v, 1) for n, v in checks):
        if value < low:
            from refusal_edit.errors import RefusalEditError

            raise RefusalEditError(f"`{name}` must be at least {low}, got {value}")
    settings = TuneSettings(
        trials=trials,
        confirm=confirm,
        max_kl=max_kl,
        max_new_tokens=max_new_tokens,
        search_prompts=search_prompts,
        batch_size=1 if rows == "auto" else int(rows),
        seed=seed,
        preserve_norm=not no_preserve_norm,
    )
    outcome = workflow(
        model,
        direction,
        out,
        settings=settings,
        n_val=n_val,
        harmful=harmful,
        harmless=harmless,
        system_prompt=system_prompt,
        template=template,
        template_kwargs=parse_template_kwargs(template_kwargs),
        dtype=dtype,
        device=device,
        resume=resume,
        force=force,
        max_memory=max_memory,
        offload_dir=offload_dir,
        batch_size=rows if rows == "auto" else None,
    )
    result = outcome.result
    base = result.base["confirmed"]
    table = Table(
        title=f"confirmed front: {len(result.trials)} trials, base refusal {_pct(base['refusal_rate'])} "
        f"({base['prompts']} harmful val prompts)"
    )
    for col in ("id", "edit", "refused", "degenerate", "first-token KL (nats)", "multi-token KL (nats)"):
        table.add_column(col, justify="left" if col in ("id", "edit") else "right")
    for p in result.confirmed:
        c = p["confirmed"]
        mark = " *" if p["id"] == result.chosen else (" (paper)" if p["reference"] else "")
        table.add_row(
            p["id"] + mark,
            p["describe"],
            _pct(c["refusal_rate"]),
            _pct(c["degenerate_rate"]),
            f"{c['first_token_kl']:.4f}",
            "-" if c["multi_token_kl"] is None else f"{c['multi_token_kl']:.4f}",
        )
    show(table)
    err.print(f"pick (*): {result.rule}")
    err.print(
        f"search {result.timings['search_s']:.0f} s, confirmation {result.timings['confirm_s']:.0f} s; "
        f"front: {outcome.front_json}  plot: {outcome.front_png}"
    )
    if result.chosen is not None:
        err.print(f"write it: refusal-edit orthogonalize {model} --spec {outcome.front_json}#{result.chosen} --out DIR")
