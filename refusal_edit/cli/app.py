"""The Typer application and the small helpers shared by the commands.

`Group` makes every command behave the same: flags show no type in the help (`--force`, not
`--force <bool>`) and path options expand `~`.
`flag_names` maps the library's parameter names to this command line's flags, so library errors (which
name parameters, in backticks) read in the user's terms: "`coeff` applies to `mode` add" becomes
"--coeff applies to --mode add".
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from pathlib import Path

import typer
from typer.core import TyperGroup

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
            for param in [*cmd.params, cmd.get_help_option(ctx)]:
                _plain_flag(param)
                _expand_user(param)
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


def _plain_flag(param) -> None:
    """A flag takes no value: show no type for it (an empty metavar is rendered as nothing)."""
    if param is not None and getattr(param, "is_flag", False) and param.metavar is None:
        param.metavar = ""


app = typer.Typer(
    cls=Group,
    name="refusal-edit",
    help="Find the refusal direction of a chat model and turn it into an exact, standalone checkpoint edit.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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
    """Replace backticked parameter names in a library message by this command's flags."""
    return re.sub(r"`([A-Za-z_][A-Za-z0-9_]*)`", lambda m: names.get(m[1], m[0]), message)


def quiet_libraries() -> None:
    """Keep third-party chatter (load reports, deprecations, progress bars) off the terminal.

    Environment variables rather than imports: commands that never need transformers (orthogonalize,
    push) should not pay for importing it.
    """
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
