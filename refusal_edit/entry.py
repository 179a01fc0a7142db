"""The console script's entry point: Ctrl-C and SIGTERM are one line from the first to the last moment.

Importing the command line (Typer, rich, torch through the edit modules) takes seconds on a busy machine;
a Ctrl-C in it would otherwise print Python's traceback of the import chain, and a SIGTERM would end the
process without a word. Here each is one line and exit code 130 / 143, as everywhere else
(`refusal_edit.cli.main`, which installs its own handling once it runs). After the command has finished,
while the interpreter shuts down (seconds with torch loaded), a signal says that the command had finished
and exits at once with the signal's code, instead of killing the process silently.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
from contextlib import suppress

from refusal_edit.interrupt import Terminated, raise_outside_imports, release_held, sigterm_raises

INTERRUPTED = 130


def _after_the_end(signum: int, frame: object) -> None:
    for stream in (sys.stdout, sys.stderr):
        with suppress(OSError, ValueError):
            stream.flush()
    name = "interrupted (Ctrl-C)" if signum == signal.SIGINT else "terminated (SIGTERM)"
    os.write(2, f"{name} after the command had finished: its output is complete\n".encode())
    os._exit(128 + signum)


def _the_end() -> int | None:
    """From here on a signal means the command has finished; the signal held in an import, if any."""
    held = release_held()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _after_the_end)
    return held


def _run() -> None:
    try:
        try:
            signal.signal(signal.SIGINT, raise_outside_imports)  # Ctrl-C held while a module is imported
            with sigterm_raises():
                from refusal_edit.cli import main as run

                run()
        except BaseException as exc:
            held = _the_end()
            if held is not None and isinstance(exc, SystemExit) and exc.code in (0, None):
                _after_the_end(held, None)  # held in a late import, then the command ended
            raise
        else:
            _the_end()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted (Ctrl-C): stopped before the end\n")
        sys.exit(INTERRUPTED)
    except Terminated as exc:
        sys.stderr.write("terminated (SIGTERM): stopped before the end\n")
        sys.exit(128 + exc.signum)


def main() -> None:
    """Run the command, then exit without the interpreter's own teardown: the exit handlers run (logging,
    temporary folders, locks) with the signal handlers above still in place, and the process ends at once,
    not seconds later with torch loaded, during which a signal would end it silently."""
    try:
        _run()
    except SystemExit as exc:
        code = exc.code
        if code is not None and not isinstance(code, int):
            sys.stderr.write(f"{code}\n")
        status = code if isinstance(code, int) else (0 if code is None else 1)
        atexit._run_exitfuncs()  # what the interpreter itself would run at exit, first
        for stream in (sys.stdout, sys.stderr):
            with suppress(OSError, ValueError):
                stream.flush()
        os._exit(status)
