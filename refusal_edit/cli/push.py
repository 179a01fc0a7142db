"""`refusal-edit push DIR --repo OWNER/NAME`: publish an edited checkpoint on the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.rule import Rule
from rich.table import Table

from refusal_edit.cli.app import app, examples, flag_names, in_flags, quiet_libraries
from refusal_edit.cli.options import INPUT, OUTPUT, optional, switch
from refusal_edit.console import err, out, show


def _size(n: int) -> str:
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= factor:
            return f"{n / factor:.2f} {unit}"
    return f"{n} B"


@app.command(
    short_help="Upload an edited checkpoint to the Hugging Face Hub (private by default).",
    epilog=examples(
        "refusal-edit push runs/demo/abliterated --repo you/qwen-coder-abliterated --dry-run  # what would go up",
        "refusal-edit push runs/demo/abliterated --repo you/qwen-coder-abliterated",
    ),
)
def push(
    folder: Path = typer.Argument(
        ..., metavar="DIR", help="Edited checkpoint, PEFT adapter or folder of GGUF files (written by orthogonalize)."
    ),
    repo: str | None = typer.Option(
        None,
        "--repo",
        help="Target model repo OWNER/NAME (NAME alone: your namespace).",
        show_default="<you>/<model>-abliterated",
        rich_help_panel=OUTPUT,
    ),
    public: bool = switch("--public", "Create the repo public; it is private otherwise.", panel=OUTPUT),
    revision: str = typer.Option(
        "main", "--revision", help="Branch to commit to (created if missing).", rich_help_panel=OUTPUT
    ),
    commit_message: str | None = typer.Option(None, "--commit-message", help="Commit summary.", rich_help_panel=OUTPUT),
    token: str | None = optional(
        "--token",
        "Hub token (prefer HF_TOKEN or `hf auth login`: a token on the command line lands in shell history).",
        "HF_TOKEN, then hf auth login",
        "<token>",
        panel=OUTPUT,
    ),
    dry_run: bool = switch("--dry-run", "Show the files and model card; contact nothing.", panel=OUTPUT),
    include: list[str] | None = typer.Option(
        None,
        "--include",
        help="Also publish the files this glob names (repeatable; `*` crosses folders), e.g. --include 'eval/*'. "
        "Only what a model repository holds goes up otherwise; files holding a secret never do.",
        metavar="PATTERN",
        rich_help_panel=INPUT,
    ),
    base_model: str | None = typer.Option(
        None,
        "--base-model",
        help="Hub id (ORG/NAME) of the base model, for a card and record that do not name it.",
        show_default="the edit record's",
        metavar="ORG/NAME",
        rich_help_panel=OUTPUT,
    ),
) -> None:
    """Upload a complete edited checkpoint with a validated model card, as one commit (private by default)."""
    quiet_libraries()
    from refusal_edit.workflows.push import plan_push, push

    job = plan_push(folder, include or (), base_model, revision, repo)
    plan = job.plan
    if job.repo_defaulted:
        err.print(f"no --repo given: {escape(job.repo)} in your namespace", soft_wrap=True)
    out.print(f"{'would push' if dry_run else 'pushing'} {escape(str(folder))}:", soft_wrap=True)
    table = Table()
    table.add_column("file")
    table.add_column("size", justify="right")
    for f in plan.files:
        table.add_row(escape(f.path_in_repo) + (" [dim](generated)[/dim]" if f.generated else ""), _size(f.size))
    table.add_row(f"[bold]{len(plan.files)} files[/bold]", f"[bold]{_size(plan.total_bytes)}[/bold]")
    show(table)
    names = flag_names(["push"])
    for name, why in plan.skipped:
        style = "dim" if why in ("hidden", "OS metadata", "cache or version-control directory") else "yellow"
        err.print(f"[{style}]skipped {escape(name)}: {escape(in_flags(why, names))}[/{style}]", soft_wrap=True)
    if dry_run:
        out.print(Rule(f"README.md{' (generated from refusal_edit.json)' if plan.card_generated else ''}"))
        out.print(plan.card, markup=False, highlight=False, soft_wrap=True)
        out.print(Rule())

    if not dry_run:
        err.print(
            f"uploading {len(plan.files)} files ({_size(plan.total_bytes)}; {len(plan.skipped)} skipped, "
            "files the repo already has are not sent again)",
            soft_wrap=True,
        )
    result = push(job, public=public, revision=revision, commit_message=commit_message, token=token, dry_run=dry_run)
    visibility = {True: "private", False: "public", None: "visibility unknown"}[result.private]
    if result.dry_run:
        out.print(
            f"dry run: would push {len(plan.files)} files ({_size(plan.total_bytes)}) to {result.url} "
            f"(revision {result.revision}, {visibility} if created); nothing was contacted",
            soft_wrap=True,
        )
        return
    for note in result.notes:
        err.print(f"[yellow]note:[/yellow] {escape(note)}", soft_wrap=True)
    if result.commit_url is None:
        out.print(f"[green]ok[/green] {result.url} already has these {len(plan.files)} files: nothing to commit")
        return
    sent = [f for f in plan.files if f.path_in_repo not in set(result.unchanged)]
    out.print(
        f"[green]ok[/green] pushed {len(sent)} files ({_size(sum(f.size for f in sent))}) to {result.url} "
        f"({visibility}, {'new repo' if result.created else 'existing repo'}, revision {result.revision})",
        soft_wrap=True,
    )
    out.print(f"commit: {result.commit_url}", soft_wrap=True)
