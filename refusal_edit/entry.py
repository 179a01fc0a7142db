"""The console script's entry point: nothing heavy is imported before Ctrl-C is handled.

Importing the command line (Typer, rich, every command module) takes a noticeable moment; a Ctrl-C in it
would otherwise print Python's traceback of the import chain. Here it is one line and exit code 130, as
everywhere else (`refusal_edit.cli.main`).
"""

from __future__ import annotations

import sys

INTERRUPTED = 130


def main() -> None:
    try:
        from refusal_edit.cli import main as run

        run()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted (Ctrl-C): stopped before the end\n")
        sys.exit(INTERRUPTED)
