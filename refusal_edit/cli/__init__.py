"""The `refusal-edit` command line: a thin Typer layer over the workflows.

Each command lives in its own module and registers itself on `app`. `main` runs Typer in its standalone
mode, so usage errors (unknown option or command, missing argument, bad value, bare `refusal-edit`) get
Typer's usage message and exit code 2. A `RefusalEditError` becomes one red line and exit code 1, with
the library's parameter names turned into this command's flags. Ctrl-C and SIGTERM unwind (atomic
output removes its temporary files on the way) and exit 130 / 143 with a message.
"""

from __future__ import annotations

import os
import sys

from rich.markup import escape

from refusal_edit.cli import (  # noqa: F401  (each module registers its command)
    archs,
    chat,
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
from refusal_edit.interrupt import Terminated, sigterm_raises

INTERRUPTED = 130  # what Typer exits with on Ctrl-C (KeyboardInterrupt)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        with sigterm_raises():
            app(prog_name="refusal-edit")
    except RefusalEditError as exc:
        message = in_flags(str(exc), flag_names(sys.argv[1:]))
        err.print(f"[bold red]error:[/bold red] {escape(message)}", soft_wrap=True)
        sys.exit(1)
    except Terminated as exc:
        err.print("[bold red]terminated[/bold red] (SIGTERM): stopped before the end", soft_wrap=True)
        sys.exit(128 + exc.signum)
    except SystemExit as exc:  # Typer turns Ctrl-C into exit code 130, silently
        if exc.code == INTERRUPTED:
            err.print("[bold red]interrupted[/bold red] (Ctrl-C): stopped before the end", soft_wrap=True)
        raise
