"""The Typer application and the small helpers shared by the commands.

`Group` makes every command behave the same: flags show no type in the help (`--force`, not
`--force <bool>`), arguments show as their names in usage lines (`MODEL`, `[EDITED]`), `-h` is `--help`
and path options expand `~`.
`flag_names` maps the library's parameter names to this command line's flags, so library errors (which
name parameters, in backticks) read in the user's terms: "`coeff` applies to `mode` add" becomes
"--coeff applies to --mode add".
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import re
import sys
import warnings
from pathlib import Path

import typer
from rich.markup import escape
from typer.core import TyperGroup

from refusal_edit import __version__
from refusal_edit.cli.options import PANELS
from refusal_edit.interrupt import Terminated

# Library parameter names that differ from a command's own parameter names.
PARAMETER_ALIASES = {
    "kind": "mode",
    "template_file": "template",
    "system": "system_prompt",
    "max_shard_bytes": "max_shard_size",
    "model_dir": "model",
    "n": "n_test",
    "prune_layer_fraction": "prune_layers",
}


class Group(TyperGroup):
    """The command group: plain flags in every command's help, `~` expanded in every path option."""

    def get_command(self, ctx, cmd_name: str):
        cmd = super().get_command(ctx, cmd_name)
        if cmd is not None:
            cmd.context_settings.setdefault("help_option_names", HELP_OPTIONS)
            cmd.help = _paragraphs(cmd.help)
            for param in [*cmd.params, cmd.get_help_option(ctx)]:
                _plain_flag(param)
                _plain_usage(param)
                _expand_user(param)
            _in_panel_order(cmd, cmd.get_help_option(ctx))
        return cmd

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        _plain_flag(option)
        return option


def _expand_user(param) -> None:
    """Path options expand `~` (a shell leaves it alone when quoted or after `--out=`)."""
    desc = getattr(param, "type_descriptor", None)
    if param is None or desc is None or not desc.is_path or getattr(param, "_expands_user", False):
        return
    inner = param.callback

    def callback(ctx, p, value):
        if isinstance(value, Path):
            value = Path(os.path.expanduser(str(value)))
        return inner(ctx, p, value) if inner is not None else value

    param.callback = callback
    param._expands_user = True


def examples(*lines: str) -> str:
    """A command's epilog: `Examples:`, then each command on its own line, its note (`COMMAND  # note`) dimmed
    on the line above it, so every command line can be copied whole."""
    shown = ["[bold]Examples:[/bold]"]
    for line in lines:
        command, *note = re.split(r"\s+#\s+", line, maxsplit=1)
        shown.extend(f"[dim]# {escape(n)}[/dim]" for n in note)
        shown.append(escape(" ".join(command.split())))
    return "\n".join(shown)


def _paragraphs(text: str | None) -> str | None:
    """A docstring's paragraphs each on one line, so the help reflows them (Typer keeps single line breaks
    in every paragraph but the first)."""
    if not text:
        return text
    return "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(text).split("\n\n"))


def _in_panel_order(cmd, help_option) -> None:
    """Options in the panels' order (input, edit, search, judging, devices, output), whatever order the command
    declares them in; `-h` at the very end, in the last panel."""

    def rank(param) -> int:
        panel = getattr(param, "rich_help_panel", None)
        return -1 if param.param_type_name == "argument" else PANELS.index(panel) if panel in PANELS else len(PANELS)

    cmd.params.sort(key=rank)
    shown = [p for p in cmd.params if not p.hidden and getattr(p, "rich_help_panel", None)]
    if help_option is not None and shown:
        help_option.rich_help_panel = shown[-1].rich_help_panel


def _plain_usage(param) -> None:
    """An argument reads as itself in the usage line: `MODEL`, `[EDITED]` (Typer writes `{MODEL}`, and
    `[[MODEL]]` for an optional argument whose metavar already has brackets)."""
    if param is None or getattr(param, "param_type_name", "") != "argument":
        return
    name = param.display_name_raw
    if not param.required and not name.startswith("["):
        name = f"[{name}]"
    shown = name + ("..." if param.nargs != 1 else "")
    param._usage_display_name = lambda: shown


def _plain_flag(param) -> None:
    """A flag takes no value: show no type for it (an empty metavar is rendered as nothing)."""
    if param is not None and getattr(param, "is_flag", False) and param.metavar is None:
        param.metavar = ""


HELP_OPTIONS = ["-h", "--help"]

app = typer.Typer(
    cls=Group,
    name="refusal-edit",
    help="Find the refusal direction of a chat model and turn it into an exact, standalone checkpoint edit.",
    epilog="Start with: refusal-edit recipes, then refusal-edit extract qwen2.5-coder-0.5b-instruct. "
    "Each command's -h ends with examples; the README and docs/ explain the rest.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": HELP_OPTIONS},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"refusal-edit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit.", metavar=""
    ),
) -> None:
    """Find the refusal direction of a chat model and turn it into an exact, standalone checkpoint edit."""


def flag_names(argv: list[str]) -> dict[str, str]:
    """{parameter name: how the command line spells it} for the command named in `argv` (empty if none)."""
    name = next((a for a in argv if not a.startswith("-")), None)
    group = typer.main.get_command(app)
    cmd = getattr(group, "commands", {}).get(name) if name else None
    if cmd is None:
        return {}
    names: dict[str, str] = {}
    for param in cmd.params:
        if param.name is None:
            continue
        longs = [o for o in param.opts if o.startswith("--")]
        if param.param_type_name == "argument":
            names[param.name] = param.metavar or param.name.upper()
        elif longs:
            names[param.name] = longs[0]
    for alias, target in PARAMETER_ALIASES.items():
        if target in names and alias not in names:
            names[alias] = names[target]
    return names


def in_flags(message: str, names: dict[str, str]) -> str:
    """Replace backticked parameter names in a library message by this command's flags; `command.name` is
    another command's parameter (a message that sends the user to `orthogonalize.mode` add)."""

    def flag(m: re.Match[str]) -> str:
        command, name = m[1], m[2]
        return (flag_names([command]) if command else names).get(name, m[0])

    return re.sub(r"`(?:([a-z][a-z-]*)\.)?([A-Za-z_][A-Za-z0-9_]*)`", flag, message)


def _no_tqdm_bars() -> None:
    """tqdm bars are for terminals: piped, transformers' (GGUF conversion, shard writing) fill a log with carriage
    returns. They take no switch from us (transformers creates them with `tqdm.auto` directly, and tqdm reads
    TQDM_DISABLE only when it is first imported), so every bar is created disabled unless its caller says."""
    from tqdm import std

    if not getattr(std.tqdm, "_off_a_terminal", False):
        std.tqdm.__init__ = functools.partialmethod(std.tqdm.__init__, disable=True)
        std.tqdm._off_a_terminal = True


def _not_an_interrupt(record: logging.LogRecord) -> bool:
    """Drop a library's log of an interrupt (Optuna logs "Trial N failed ... KeyboardInterrupt" with the whole
    traceback before re-raising it): the command line says "interrupted" in one line."""
    kind = record.exc_info[0] if record.exc_info else None
    return not (kind is not None and issubclass(kind, KeyboardInterrupt | Terminated))


def quiet_libraries() -> None:
    """Keep third-party chatter (load reports, deprecations, progress bars, tracebacks of interrupts that
    libraries log) off the terminal.

    Environment variables and logger settings rather than imports: commands that never need transformers
    (orthogonalize, push) should not pay for importing it.
    """
    optuna_trials = logging.getLogger("optuna.study._optimize")  # where Optuna logs a failed trial
    if _not_an_interrupt not in optuna_trials.filters:
        optuna_trials.addFilter(_not_an_interrupt)
    warnings.filterwarnings("ignore")
    if not sys.stderr.isatty():
        _no_tqdm_bars()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
