"""SIGTERM as an exception, so that a terminated run cleans up exactly as an interrupted one does.

Python's default SIGTERM action ends the process at once: no `finally` runs, and an atomic write leaves
its temporary directory behind. The library installs nothing global; the command line wraps its work in
`sigterm_raises()` and reports `Terminated` like KeyboardInterrupt (exit code 128 + 15).

Writers note each output they complete (`output_complete`), so that an interrupt arriving after the work
is done (while results are being printed) says the output is whole instead of "stopped before the end".
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_completed: list[Path] = []


def output_complete(path: Path) -> None:
    """Note that `path` was written whole (its final rename done)."""
    _completed.append(Path(path))


def completed_outputs(reset: bool = False) -> list[Path]:
    """The outputs completed since the last reset (`reset`: forget them, at the start of a command)."""
    done = list(_completed)
    if reset:
        _completed.clear()
    return done


class Terminated(BaseException):
    """The process received SIGTERM. A BaseException, like KeyboardInterrupt: `except Exception` does
    not swallow it, while `finally` blocks and context managers still clean up."""

    exit_code = 128 + signal.SIGTERM

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


def _raise(signum: int, frame: object) -> None:
    raise Terminated(signum)


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """While active, SIGTERM raises `Terminated` in the main thread; the previous handler is restored after.
    Outside the main thread (where handlers cannot be installed) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
