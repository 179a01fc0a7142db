"""The console script's entry point: nothing heavy is imported before Ctrl-C and SIGTERM are handled.

Importing the command line (Typer, rich, torch through the edit modules) takes seconds on a busy machine;
a Ctrl-C in it would otherwise print Python's traceback of the import chain, and a SIGTERM would end the
process without a word. Here each is one line and exit code 130 / 143, as everywhere else
(`refusal_edit.cli.main`, which installs its own handling once it runs).
"""

from __future__ import annotations

import sys

from refusal_edit.interrupt import Terminated, sigterm_raises

INTERRUPTED = 130


def main() -> None:
    try:
        with sigterm_raises():
            from refusal_edit.cli import main as run

            run()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted (Ctrl-C): stopped before the end\n")
        sys.exit(INTERRUPTED)
    except Terminated as exc:
        sys.stderr.write("terminated (SIGTERM): stopped before the end\n")
        sys.exit(128 + exc.signum)
