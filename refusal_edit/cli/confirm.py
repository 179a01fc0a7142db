"""`refusal-edit confirm MODEL --direction D --points P`: edit points confirmed on more prompts than tune's val."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

import refusal_edit.cli.options as opt
from refusal_edit.cli.app import app, examples, quiet_libraries
from refusal_edit.console import err


def line(label: str, m: dict[str, Any]) -> str:
    """One point's numbers on one line: refused (95% CI), degenerate, both KLs."""
    lo, hi = m["refusal_ci95"]
    mt = m["multi_token_kl"]
    return (
        f"{label:24s} refused {100 * m['refusal_rate']:5.1f} % (95% CI {100 * lo:.1f}-{100 * hi:.1f})  "
        f"degenerate {100 * m['degenerate_rate']:4.1f} %  first-token KL {m['first_token_kl']:.4f}  "
        f"multi-token KL {'-' if mt is None else f'{mt:.4f}'}"
    )


@app.command(
    short_help="Confirm edit points on more prompts (the train split, cross-fitted) than tune can afford.",
    epilog=examples(
        "refusal-edit confirm qwen2.5-coder-0.5b-instruct --direction runs/demo/direction "
        "--points runs/demo/tune/front.json --cross-fit --out runs/demo/crossfit.json   # every front point",
        "refusal-edit confirm MODEL --direction D --points points.json --split test   # {label: spec} on test",
    ),
)
def confirm(
    model: str = typer.Argument(..., metavar="MODEL", help=opt.MODEL_HELP),
    direction: Path = opt.DIRECTION,
    points: Path = typer.Option(
        ...,
        "--points",
        help="A tune front.json (every confirmed point), or a JSON file {label: spec} ({} is the paper's edit).",
        metavar="<file>",
        rich_help_panel=opt.INPUT,
    ),
    split: str = typer.Option(
        "train", help="The harmful prompts' split: train|val|test.", metavar="<split>", rich_help_panel=opt.INPUT
    ),
    cross_fit: bool = opt.switch(
        "--cross-fit",
        "Each half of the train prompts makes the edits judged on the other half; counts pooled, KLs averaged "
        "(fair to edits with more fitted directions).",
        panel=opt.JUDGING,
    ),
    kl_prompts: int = typer.Option(16, help="Harmless val prompts for the KL.", rich_help_panel=opt.JUDGING),
    max_new_tokens: int = typer.Option(
        32, help="Greedy tokens per reply (and per KL continuation).", rich_help_panel=opt.JUDGING
    ),
    batch_size: int = typer.Option(32, help="Prompts per generation batch.", rich_help_panel=opt.DEVICES),
    dtype: str = opt.DTYPE,
    device: str = opt.DEVICE,
    out: Path | None = opt.optional("--out", "Write every point's numbers here (JSON).", "none", "<file>", opt.OUTPUT),
    force: bool = opt.switch("--force", "Replace an existing --out file (never the --points file).", opt.OUTPUT),
) -> None:
    """Confirm edit points (tune's front, or any edit specs) with tune's confirmer on a whole split: greedy replies
    judged by the refusal markers, degenerate replies apart, first-token and multi-token KL on harmless val
    prompts; one line per point on stdout."""
    quiet_libraries()
    from refusal_edit.workflows.confirm import confirm_points

    done = confirm_points(
        model,
        direction,
        points,
        split=split,
        cross_fit=cross_fit,
        kl_prompts=kl_prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        out=out,
        force=force,
        dtype=dtype,
        device=device,
    )
    for label, numbers in done.points.items():
        print(line(label, numbers), flush=True)
    err.print(f"{done.seconds:.0f} s" + (f"; written to {escape(str(done.out))}" if done.out else ""))
