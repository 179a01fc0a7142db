"""The `refusal-edit` command line: a thin Typer layer over the library.

Each command lives in its own module and registers itself on `app`; `main` turns a
`RefusalEditError` into one red line and exit code 1.
"""

from __future__ import annotations

import os
import sys

from refusal_edit.cli import archs, evaluate, extract, fetch, orthogonalize, push  # noqa: F401  (registration)
from refusal_edit.cli.app import app
from refusal_edit.console import console
from refusal_edit.errors import RefusalEditError


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app(standalone_mode=False)
    except RefusalEditError as exc:
        console.print(f"[bold red]error:[/bold red] {exc}", soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # click usage errors arrive here with standalone_mode=False
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        raise
