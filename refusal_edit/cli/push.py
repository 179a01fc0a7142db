"""`refusal-edit push DIR --repo OWNER/NAME`: publish an edited checkpoint on the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.rule import Rule
from rich.table import Table

from refusal_edit.cli.app import app, quiet_libraries
from refusal_edit.console import console


def _size(n: int) -> str:
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= factor:
            return f"{n / factor:.2f} {unit}"
    return f"{n} B"


@app.command()
def push(
    folder: Path = typer.Argument(..., help="Edited checkpoint directory (written by orthogonalize)."),
    repo: str = typer.Option(..., "--repo", help="Target model repo OWNER/NAME (NAME alone: your namespace)."),
    public: bool = typer.Option(False, "--public", help="Create the repo public (default: private)."),
    revision: str = typer.Option("main", "--revision", help="Branch to commit to (created if missing)."),
    commit_message: str | None = typer.Option(None, "--commit-message", help="Commit summary."),
    token: str | None = typer.Option(
        None, "--token", help="Hub token (default: HF_TOKEN, then `hf auth login`; prefer those).", show_default=False
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the files and model card; contact nothing."),
) -> None:
    """Upload a complete edited checkpoint with a validated model card, as one commit (private by default)."""
    quiet_libraries()
    from refusal_edit.hub import check_folder, push_folder

    plan = check_folder(folder)
    table = Table(title=escape(f"{'would push' if dry_run else 'pushing'}: {folder}"))
    table.add_column("file")
    table.add_column("size", justify="right")
    for f in plan.files:
        table.add_row(escape(f.path_in_repo) + (" [dim](generated)[/dim]" if f.generated else ""), _size(f.size))
    table.add_row(f"[bold]{len(plan.files)} files[/bold]", f"[bold]{_size(plan.total_bytes)}[/bold]")
    console.print(table)
    for name, why in plan.skipped:
        style = "yellow" if "weights" in why else "dim"
        console.print(f"[{style}]skipped {escape(name)}: {why}[/{style}]", soft_wrap=True)

    if dry_run:
        console.print(Rule(f"README.md{' (generated from refusal_edit.json)' if plan.card_generated else ''}"))
        console.print(plan.card, markup=False, highlight=False, soft_wrap=True)
        console.print(Rule())

    result = push_folder(
        folder,
        repo,
        public=public,
        revision=revision,
        commit_message=commit_message,
        token=token,
        dry_run=dry_run,
        plan=plan,
    )
    visibility = {True: "private", False: "public", None: "visibility unknown"}[result.private]
    if result.dry_run:
        console.print(
            f"dry run: would push {len(plan.files)} files ({_size(plan.total_bytes)}) to {result.url} "
            f"(revision {result.revision}, {visibility} if created); nothing was contacted",
            soft_wrap=True,
        )
        return
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {note}", soft_wrap=True)
    if len(result.unchanged) == len(plan.files):
        console.print(f"[green]ok[/green] {result.url} already has these {len(plan.files)} files: nothing to commit")
        return
    sent = [f for f in plan.files if f.path_in_repo not in set(result.unchanged)]
    console.print(
        f"[green]ok[/green] pushed {len(sent)} files ({_size(sum(f.size for f in sent))}) to {result.url} "
        f"({visibility}, {'new repo' if result.created else 'existing repo'}, revision {result.revision})",
        soft_wrap=True,
    )
    console.print(f"commit: {result.commit_url}", soft_wrap=True)
