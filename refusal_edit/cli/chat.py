"""`refusal-edit chat MODEL [EDITED]`: talk to a model, or to a base model and its edit side by side."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import typer
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

import refusal_edit.cli.options as opt
from refusal_edit.cli.app import app, examples, quiet_libraries
from refusal_edit.console import err, out
from refusal_edit.errors import RefusalEditError

COMMANDS = "/reset clears the conversation, /system TEXT sets the system prompt (/system alone: the default), /quit"


@app.command(
    short_help="Talk to a model, or to a base model and its edit side by side.",
    epilog=examples(
        "refusal-edit chat qwen2.5-coder-0.5b-instruct runs/demo/abliterated  # the base model and its edit",
        "refusal-edit chat qwen2.5-coder-0.5b-instruct --direction runs/demo/direction  # the edit as hooks",
        "refusal-edit chat MODEL EDITED --prompt 'How do I pick a lock?' --json  # one shot, scriptable",
    ),
)
def chat(
    model: str = typer.Argument(..., metavar="MODEL", help=opt.MODEL_HELP),
    edited: str | None = typer.Argument(
        None,
        metavar="EDITED",
        help="A second model answering every turn beside MODEL (an edited checkpoint, whoever made it).",
        show_default=False,
    ),
    direction: Path | None = opt.optional(
        "--direction",
        "direction.safetensors (or its folder): MODEL with this edit as hooks answers beside MODEL.",
        "the one --spec was tuned with",
        panel=opt.INPUT,
    ),
    spec: str | None = opt.SPEC,
    prompt: list[str] | None = typer.Option(
        None,
        "--prompt",
        help="Answer this prompt and exit (repeatable; each prompt a new conversation).",
        metavar="TEXT",
        rich_help_panel=opt.INPUT,
    ),
    prompt_file: Path | None = opt.optional(
        "--prompt-file", "Answer each line of this file as --prompt does.", False, panel=opt.INPUT
    ),
    system_prompt: str | None = opt.SYSTEM_PROMPT,
    template: Path | None = opt.TEMPLATE,
    template_kwargs: list[str] | None = opt.TEMPLATE_KWARGS,
    layers: str | None = opt.LAYERS,
    weight: float | None = opt.WEIGHT,
    per_layer: bool = opt.PER_LAYER,
    projected: bool = opt.PROJECTED,
    rank: int = opt.RANK,
    basis: str = opt.BASIS,
    preserve_norm: bool = opt.PRESERVE_NORM,
    mode: str = opt.MODE,
    coeff: float = opt.COEFF,
    layer: int | None = opt.LAYER,
    site: str | None = opt.SITE,
    unit: bool = opt.UNIT,
    max_new_tokens: int = typer.Option(256, help="Tokens per reply at most.", rich_help_panel=opt.OUTPUT),
    temperature: float = typer.Option(
        0.0,
        help="0: greedy (the two models comparable, every run the same); above 0: sampled.",
        rich_help_panel=opt.OUTPUT,
    ),
    as_json: bool = opt.switch(
        "--json", "With --prompt: print only a JSON list of the prompts and every model's reply.", panel=opt.OUTPUT
    ),
    dtype: str = opt.DTYPE,
    device: str = opt.DEVICE,
    max_memory: str | None = opt.MAX_MEMORY,
    offload_dir: Path | None = opt.OFFLOAD_DIR,
) -> None:
    """Talk to MODEL under its own chat template and default system prompt, replies streamed as they are
    generated; with EDITED, or with --direction (the edit orthogonalize would write, as hooks), every message is
    answered by both, side by side.

    At the prompt: /reset clears the conversation, /system TEXT sets the system prompt (/system alone goes back
    to the default), /quit or Ctrl-D ends; Ctrl-C stops a reply. With --prompt or --prompt-file the prompts are
    answered and the command exits: results on stdout, nothing interactive."""
    quiet_libraries()
    from refusal_edit.workflows.chat import one_shot_prompts, open_chat
    from refusal_edit.workflows.planning import edit_from_options

    prompts = one_shot_prompts(prompt, prompt_file)
    if as_json and not prompts:
        raise RefusalEditError("`as_json` prints the replies to `prompt`: give `prompt` or `prompt_file`")
    session = open_chat(
        model,
        edited,
        direction=direction,
        edit=edit_from_options(**opt.edit_options(locals())),
        **opt.chat(system_prompt, template),
        template_kwargs=template_kwargs,
        **opt.placement(dtype, device, max_memory, offload_dir),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
    )
    if prompts:
        one_shot(session, prompts, as_json)
    else:
        converse(session)


def one_shot(session, prompts: list[str], as_json: bool) -> None:
    """Each prompt in a new conversation, every model's reply on stdout (streamed, or all at the end as JSON)."""
    results = []
    for text in prompts:
        session.reset()
        if as_json:
            replies = session.ask(text)
            results.append({"prompt": text, "replies": [asdict(r) for r in replies]})
            continue
        out.print(f"[bold]> {escape(text)}[/bold]", soft_wrap=True)
        show_turn(session, text)
    if as_json:
        sys.stdout.write(json.dumps(results, indent=2, ensure_ascii=False) + "\n")


def converse(session) -> None:
    """The interactive loop: messages and /commands from stdin until /quit, end of input or Ctrl-C."""
    typed = sys.stdin.isatty()
    err.print(f"chatting with {' and '.join(escape(label) for label in session.labels)}", soft_wrap=True)
    err.print(f"[dim]{COMMANDS}[/dim]", soft_wrap=True)
    while True:
        try:
            line = input("you> " if typed else "")
        except (EOFError, KeyboardInterrupt):
            out.print()
            return
        text = line.strip()
        if not text:
            continue
        if not typed:  # a transcript of scripted input shows what was said
            out.print(f"[bold]you> {escape(text)}[/bold]", soft_wrap=True)
        if text.startswith("/"):
            if not command(session, text):
                return
            continue
        try:
            show_turn(session, text)
        except KeyboardInterrupt:
            out.print()
            err.print("[yellow]stopped[/yellow]: this turn is not kept", soft_wrap=True)


def command(session, text: str) -> bool:
    """Run a /command; False ends the chat."""
    name, _, rest = text.partition(" ")
    if name in ("/quit", "/exit", "/q"):
        return False
    if name == "/reset":
        session.reset()
        err.print("conversation cleared", soft_wrap=True)
    elif name == "/system":
        session.set_system(rest.strip() or None)
        shown = session.system if session.system is not None else "the chat template's default"
        err.print(f"system prompt: {escape(shown)} (conversation cleared)", soft_wrap=True)
    else:
        err.print(f"unknown command {escape(name)}: {COMMANDS}", soft_wrap=True)
    return True


def show_turn(session, text: str) -> None:
    """Every model's reply to `text`, streamed: one model inline; two side by side on a terminal (one after the
    other, each under its name, in a pipe or a log); then each reply's timing on stderr."""
    labels = session.labels
    if len(labels) > 1 and out.is_terminal:
        pieces = ["" for _ in labels]

        def columns() -> Table:
            grid = Table.grid(expand=True, padding=(0, 1))
            for _ in labels:
                grid.add_column(ratio=1)
            panels = [
                Panel(Text(p), title=escape(lab), title_align="left") for lab, p in zip(labels, pieces, strict=True)
            ]
            grid.add_row(*panels)
            return grid

        with Live(columns(), console=out, auto_refresh=False) as live:

            def on_text(i: int, piece: str) -> None:
                pieces[i] += piece
                live.update(columns(), refresh=True)

            replies = session.ask(text, on_text)
    else:
        current = [-1]

        def on_text(i: int, piece: str) -> None:
            if current[0] != i:  # the first piece of a reply (empty) names its model
                if current[0] >= 0:
                    out.print()
                current[0] = i
                out.print(f"[bold cyan]{escape(labels[i])}:[/bold cyan] ", end="", soft_wrap=True)
            out.print(piece, end="", markup=False, highlight=False, soft_wrap=True)
            out.file.flush()

        replies = session.ask(text, on_text)
        out.print()
    for r in replies:
        first = f"first token after {r.first_token_s:.2f} s, " if r.first_token_s is not None else ""
        err.print(f"[dim]{escape(r.label)}: {r.tokens} tokens, {first}{r.seconds:.1f} s[/dim]", soft_wrap=True)
