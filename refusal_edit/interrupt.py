"""SIGTERM as an exception, so that a terminated run cleans up exactly as an interrupted one does.

Python's default SIGTERM action ends the process at once: no `finally` runs, and an atomic write leaves
its temporary directory behind. The library installs nothing global; the command line wraps its work in
`sigterm_raises()` and reports `Terminated` like KeyboardInterrupt (exit code 128 + 15).

A signal that arrives while a module is being imported is held until the import is over: a Ctrl-C inside
numpy's or torch's C-extension initialisation leaves the module half-made in the process (later imports
fail with "cannot load module more than once" or a RecursionError instead of the interrupt). The handlers
here poll every 20 ms (SIGALRM) until no import frame is on the stack, then raise.

Writers note each output they complete (`output_complete`), so that an interrupt arriving after the work
is done (while results are being printed) says the output is whole instead of "stopped before the end".
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

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


_RETRY_S = 0.02
_held: list[int] = []  # a signal that arrived during an import, raised once the import is over


def _importing(frame: FrameType | None) -> bool:
    """Whether `frame` runs inside an import (the interpreter's import machinery is on the stack)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _deliver(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


def _retry(_signum: int, frame: FrameType | None) -> None:
    if not _held:
        return
    if _importing(frame):
        signal.setitimer(signal.ITIMER_REAL, _RETRY_S)
        return
    _deliver(_held.pop())


def raise_outside_imports(signum: int, frame: FrameType | None) -> None:
    """A signal handler: raise KeyboardInterrupt (SIGINT) or `Terminated` now, or, inside an import, as
    soon as the import is over."""
    if not _importing(frame):
        _deliver(signum)
    if not _held:
        _held.append(signum)
        signal.signal(signal.SIGALRM, _retry)
        signal.setitimer(signal.ITIMER_REAL, _RETRY_S)


def release_held() -> int | None:
    """Stop waiting for an import to end; the signal that was held, if any (the caller decides what it
    means now, e.g. after the command has finished)."""
    if not _held:
        return None
    signal.setitimer(signal.ITIMER_REAL, 0)
    return _held.pop()


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """While active, SIGTERM raises `Terminated` in the main thread (held while a module is imported); the
    previous handler is restored after. Outside the main thread (where handlers cannot be installed) it does
    nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, raise_outside_imports)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
