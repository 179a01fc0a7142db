"""The Typer application and small helpers shared by the commands."""

from __future__ import annotations

import logging
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
    """Keep third-party chatter (load reports, deprecations) off the terminal."""
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
