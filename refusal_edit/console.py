"""Shared rich console and progress bars, so every long loop looks and behaves the same."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")

# Progress and tables go to stderr so that `--json` output on stdout stays machine-readable.
# Logs and pipes get 120 columns instead of rich's default 80, so paths and tables do not wrap.
console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 120)


def quiet() -> bool:
    """Progress bars are hidden off a terminal, under pytest, or with REFUSAL_EDIT_QUIET (logs stay readable)."""
    return bool(os.environ.get("REFUSAL_EDIT_QUIET")) or "pytest" in sys.modules or not console.is_terminal


def progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=quiet(),
    )


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar (hidden when quiet)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress() as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)
