"""The `refusal-edit` command line: a thin Typer layer over the workflows.

Each command lives in its own module and registers itself on `app`. `main` runs Typer in its standalone
mode, so usage errors (unknown option or command, missing argument, bad value, bare `refusal-edit`) get
Typer's usage message and exit code 2. A `RefusalEditError` becomes one red line and exit code 1, with
the library's parameter names turned into this command's flags. Ctrl-C and SIGTERM unwind (atomic
output removes its temporary files on the way) and exit 130 / 143 with a message that says whether the
output was already complete. The console script enters through `refusal_edit.entry`, so that Ctrl-C
while this package is still being imported is one line too.
"""

from __future__ import annotations

import os
import sys

from rich.markup import escape

from refusal_edit.cli import (  # noqa: F401  (each module registers its command)
    archs,
    chat,
    confirm,
    evaluate,
    export_cvec,
    extract,
    fetch,
    orthogonalize,
    push,
    recipes,
    tune,
)
from refusal_edit.cli.app import app, flag_names, in_flags
from refusal_edit.console import err
from refusal_edit.errors import RefusalEditError
from refusal_edit.interrupt import Terminated, completed_outputs, sigterm_raises

INTERRUPTED = 130  # what Typer exits with on Ctrl-C (KeyboardInterrupt)


def _stopped() -> str:
    """What an interrupt left: nothing of this run's output, or outputs that were already complete."""
    done = completed_outputs()
    if not done:
        return "stopped before the end"
    return f"after the output was complete ({', '.join(escape(str(p)) for p in done)}: whole, nothing lost)"


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    completed_outputs(reset=True)
    try:
        with sigterm_raises():
            app(prog_name="refusal-edit")
    except RefusalEditError as exc:
        message = in_flags(str(exc), flag_names(sys.argv[1:]))
        err.print(f"[bold red]error:[/bold red] {escape(message)}", soft_wrap=True)
        sys.exit(1)
    except Terminated as exc:
        err.print(f"[bold red]terminated[/bold red] (SIGTERM): {_stopped()}", soft_wrap=True)
        sys.exit(128 + exc.signum)
    except SystemExit as exc:  # Typer turns Ctrl-C into exit code 130, silently
        if exc.code == INTERRUPTED:
            err.print(f"[bold red]interrupted[/bold red] (Ctrl-C): {_stopped()}", soft_wrap=True)
        raise
