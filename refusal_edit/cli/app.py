"""The Typer application and small helpers shared by the commands."""

from __future__ import annotations

import logging
import os
import sys
import warnings

import typer

app = typer.Typer(
    name="refusal-edit",
    help="Find the refusal direction of a chat model and turn it into an exact, standalone checkpoint edit.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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
