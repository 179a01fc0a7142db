"""`refusal-edit tune MODEL --direction D`: the refusal-vs-damage front of the edit variants."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

import refusal_edit.cli.options as opt
from refusal_edit.cli.app import app, examples, quiet_libraries
from refusal_edit.console import err, show


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


@app.command(
    short_help="Search edit variants for the refusal-damage front and pick a confirmed point.",
    epilog=examples(
        "refusal-edit tune qwen2.5-coder-0.5b-instruct --direction runs/demo/direction --out runs/demo/tune  "
        "# the demo model: ~7 min on 2 CPU cores before held-out judging (~3 min more, estimated)",
        "refusal-edit tune MODEL --direction D --trials 24 --confirm 3 --n-val 24   # smaller and faster",
        "refusal-edit tune MODEL --direction D --out runs/x/tune --resume           # continue a study",
    ),
)
def tune(
    model: str = typer.Argument(..., metavar="MODEL", help=opt.MODEL_HELP),
    direction: Path = opt.DIRECTION,
    out: Path | None = opt.optional("--out", "Study folder.", "runs/<model>/tune", "<dir>", panel=opt.OUTPUT),
    trials: int = typer.Option(32, help="Optuna trials in all (the seed points included).", rich_help_panel=opt.SEARCH),
    refine: int = typer.Option(
        6,
        help="Last trials (at most a quarter): the strongest low-damage point bridged 0.4 and 0.7 of the way to "
        "the paper's edit (a per-layer one from 0, in its downstream form), the lowest-refusal front points at "
        "0.8 and 0.6 of their strength, and last the bridge point whose KL proxy matches the paper's edit's.",
        rich_help_panel=opt.SEARCH,
    ),
    confirm: int = typer.Option(
        4,
        help="Front points confirmed by greedy generation (plus the paper's edit and the bridge points).",
        rich_help_panel=opt.SEARCH,
    ),
    n_val: int = typer.Option(
        32, help="Harmful validation prompts whose replies confirm each point.", rich_help_panel=opt.SEARCH
    ),
    search_prompts: int = typer.Option(
        16, help="Prompts per side scored in every search trial (and for KL).", rich_help_panel=opt.SEARCH
    ),
    max_new_tokens: int = typer.Option(
        48, help="Greedy tokens per reply (and per KL continuation) when confirming.", rich_help_panel=opt.SEARCH
    ),
    no_preserve_norm: bool = opt.switch(
        "--no-preserve-norm", "Leave norm-preserving edits out of the search.", panel=opt.SEARCH
    ),
    seed: int = typer.Option(0, help="Sampler seed.", rich_help_panel=opt.SEARCH),
    pick: str = typer.Option(
        "least-damage",
        help="Which point front.json names. least-damage: the least first-token (then multi-token) KL among the "
        "points whose refused-or-degenerate rate cannot be told from the lowest (95% intervals; held out: within "
        "--margin); fewest-refusals; "
        "least-damage-under:KL (least-damage with --max-kl KL); or a point id such as t27.",
        metavar="RULE",
        rich_help_panel=opt.SEARCH,
    ),
    margin: str | None = typer.Option(
        None,
        help="least-damage on the held-out prompts: a point ties with the lowest rate only when the upper end of its "
        "gap's 95% interval (paired) is under this many percentage points (default 8); off: only a gap resolvably "
        "above zero loses.",
        metavar="PTS|off",
        rich_help_panel=opt.SEARCH,
    ),
    max_kl: float | None = opt.optional(
        "--max-kl",
        "Pick only among points with first-token KL (nats) at most this.",
        "no cap",
        "<nats>",
        panel=opt.SEARCH,
    ),
    resolve: int = typer.Option(
        3,
        help="Points that could be picked judged again per round on the cross-fitted train prompts (more prompts, "
        "none fitted to: each half's directions judged on the other half); 0: the pick rests on val.",
        rich_help_panel=opt.SEARCH,
    ),
    resolve_prompts: int = typer.Option(
        96,
        help="Held-out harmful prompts those points are judged on (32 tokens a reply): in each half, the ones the base "
        "model refuses most.",
        rich_help_panel=opt.SEARCH,
    ),
    harmful: str | None = opt.prompts("Harmful", "the recipe's, else builtin:harmful", " Their val split is used."),
    harmless: str | None = opt.prompts("Harmless", "the recipe's, else builtin:harmless", " Their val split is used."),
    system_prompt: str | None = opt.SYSTEM_PROMPT,
    template: Path | None = opt.TEMPLATE,
    template_kwargs: list[str] | None = opt.TEMPLATE_KWARGS,
    batch_size: str = opt.BATCH_SIZE,
    dtype: str = opt.DTYPE,
    device: str = opt.DEVICE,
    max_memory: str | None = opt.MAX_MEMORY,
    offload_dir: Path | None = opt.OFFLOAD_DIR,
    load_in: str | None = opt.LOAD_IN,
    resume: bool = opt.switch("--resume", "Continue the study in --out.", panel=opt.OUTPUT),
    force: bool = opt.switch(
        "--force", "Start over in --out (removes only a previous study's files).", panel=opt.OUTPUT
    ),
    allow_foreign_direction: bool = opt.switch(
        "--allow-foreign-direction",
        "Tune a direction extracted from another model (an error otherwise).",
        panel=opt.INPUT,
    ),
) -> None:
    """Search edit variants (per-layer strength, per-layer / interpolated / projected directions, norm
    preservation) with Optuna on cheap proxies, confirm the best points by generation, and pick one.
    Write it with `refusal-edit orthogonalize MODEL --spec DIR/front.json[#ID]`."""
    quiet_libraries()
    from refusal_edit.workflows.tune import tune as workflow
    from refusal_edit.workflows.tune import tune_settings

    # The settings by name (auto: the batch size chosen once the model is loaded).
    settings, auto = tune_settings({**locals(), "preserve_norm": not no_preserve_norm})
    outcome = workflow(
        model,
        direction,
        out,
        settings=settings,
        n_val=n_val,
        harmful=harmful,
        harmless=harmless,
        **opt.chat(system_prompt, template),
        template_kwargs=template_kwargs,
        **opt.placement(dtype, device, max_memory, offload_dir),
        load_in=load_in,
        resume=resume,
        force=force,
        batch_size=auto,
        allow_foreign_direction=allow_foreign_direction,
    )
    result = outcome.result
    show(front_table(result))
    err.print(f"pick (*): {result.rule}")
    for line in nearer_lines(result):
        err.print(line)
    t = result.timings
    err.print(
        f"search {t['search_s']:.0f} s, confirmation {t['confirm_s']:.0f} s, held-out judging {t['resolve_s']:.0f} s; "
        f"front: {outcome.front_json}  plot: {outcome.front_png}"
    )
    if result.chosen is not None:
        err.print(f"write it: refusal-edit orthogonalize {model} --spec {outcome.front_json}#{result.chosen} --out DIR")


def _rate(rate: float, ci: list[float]) -> str:
    return f"{_pct(rate)} ({'-'.join(_pct(x) for x in ci)})"


def front_table(result) -> Table:
    """Every confirmed point's judged numbers, each rate with its Wilson 95 % interval."""
    base = result.base["confirmed"]
    table = Table(
        title=f"confirmed front: {len(result.trials)} trials, base refusal "
        f"{_rate(base['refusal_rate'], base['refusal_ci95'])} ({base['prompts']} harmful val prompts)"
    )
    columns = (
        "id",
        "edit",
        "refused (95% CI)",
        "degenerate",
        "refused or degenerate (95% CI)",
        "held-out: refused or degenerate (95% CI)",
        "first-token KL (nats)",
        "multi-token KL (nats)",
    )
    for col in columns:
        table.add_column(col, justify="left" if col in ("id", "edit") else "right")
    for p in result.confirmed:
        c, r = p["confirmed"], p.get("resolved")
        mark = " *" if p["id"] == result.chosen else (" (paper)" if p["reference"] else "")
        held = (
            "-"
            if not r
            else f"{_rate((r['refused'] + r['degenerate']) / r['prompts'], r['failure_ci95'])} of {r['prompts']}"
        )
        table.add_row(
            p["id"] + mark,
            p["describe"],
            _rate(c["refusal_rate"], c["refusal_ci95"]),
            _pct(c["degenerate_rate"]),
            _rate(c["refusal_rate"] + c["degenerate_rate"], c["failure_ci95"]),
            held,
            f"{c['first_token_kl']:.4f}",
            "-" if c["multi_token_kl"] is None else f"{c['multi_token_kl']:.4f}",
        )
    return table


def nearer_lines(result) -> list[str]:
    """Why each point with less first-token KL than the pick lost (front.json has every point's verdict)."""
    if result.chosen is None:
        return []
    chosen = result.point()["confirmed"]["first_token_kl"]
    verdicts = result.pick["verdicts"]
    nearer = sorted(
        (p for p in result.confirmed if p["confirmed"]["first_token_kl"] < chosen and p["id"] in verdicts),
        key=lambda p: p["confirmed"]["first_token_kl"],
    )
    return [f"  {p['id']} lost: {verdicts[p['id']]}" for p in nearer]
