"""Shared rich consoles and progress, so every long loop looks and behaves the same.

Results (tables, JSON) go to `out` (stdout); progress, notes and errors go to `err` (stderr), so
`refusal-edit archs | grep qwen` and `evaluate --json > report.json` work. `console` is `err`, the name
the library's progress notes use.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from rich.console import Console, RenderableType
from rich.measure import Measurement
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.segment import Segments

T = TypeVar("T")

# Logs and pipes get 120 columns instead of rich's default 80 for tables, and lines of text are never wrapped
# there (soft wrap): a note is one line in a log, however long, so it can be grepped.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 120, soft_wrap=not sys.stdout.isatty())
err = Console(
    stderr=True, highlight=False, width=None if sys.stderr.isatty() else 120, soft_wrap=not sys.stderr.isatty()
)
console = err

UNBOUNDED = 100_000  # measure tables without a width limit (rich clamps measurements to the console's)
LINE_INTERVAL = 1.0  # seconds between two progress lines off a terminal (the last step always prints)


def show(renderable: RenderableType, target: Console | None = None) -> None:
    """Print a table (or any renderable) that fits the width by wrapping its cells, never by cropping.

    rich truncates the cells of a table whose narrowest layout (longest word per column) is wider than the
    console, and crops its lines; such a table is laid out at that narrowest width instead (a terminal then
    wraps the long lines, a log keeps them whole).
    """
    c = target or out
    narrowest = Measurement.get(c, c.options.update_width(UNBOUNDED), renderable).minimum
    if narrowest <= c.width:
        c.print(renderable, soft_wrap=False)  # a table's cells wrap within it, even where text lines do not
        return
    lines = c.render_lines(renderable, c.options.update_width(narrowest), new_lines=True)
    c.print(Segments([segment for line in lines for segment in line]), crop=False, end="")


def quiet() -> bool:
    """No progress at all under pytest or with REFUSAL_EDIT_QUIET."""
    return bool(os.environ.get("REFUSAL_EDIT_QUIET")) or "pytest" in sys.modules


def _fmt_seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 60 else f"{int(s // 60)} min {s % 60:02.0f} s"


class LineProgress:
    """Progress for logs and pipes: one plain line per step (count and time), at most one a second.

    The same interface as the parts of `rich.progress.Progress` the package uses (`add_task`, `advance`,
    context manager), so callers never know which one they got.
    """

    def __init__(self, target: Console, disable: bool = False) -> None:
        self.target = target
        self.disable = disable
        self.tasks: dict[int, dict[str, Any]] = {}
        self.lock = threading.Lock()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, **_: Any) -> int:
        with self.lock:
            task_id = len(self.tasks)
            now = time.monotonic()
            self.tasks[task_id] = {"description": description, "total": total, "done": 0.0, "start": now, "last": now}
            return task_id

    def update(self, task_id: int, advance: float = 0, description: str | None = None, **_: Any) -> None:
        """`rich.progress.Progress.update`'s `advance` and `description` (a step's result in its line)."""
        if description is not None:
            with self.lock:
                self.tasks[task_id]["description"] = description
        if advance:
            self.advance(task_id, advance)

    def advance(self, task_id: int, advance: float = 1) -> None:
        with self.lock:
            task = self.tasks[task_id]
            task["done"] += advance
            now = time.monotonic()
            finished = task["total"] is not None and task["done"] >= task["total"]
            if self.disable or (now - task["last"] < LINE_INTERVAL and not finished):
                return
            task["last"] = now
            total, done = task["total"], task["done"]
            if total is None:
                count = f"{done:g}"
            elif total >= 10_000:  # bytes and the like: a share reads better than two long numbers
                count = f"{100 * done / total:.0f}%"
            else:
                count = f"{done:g}/{total:g}"
            self.target.print(
                f"{task['description']}: {count} ({_fmt_seconds(now - task['start'])})",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )


def progress() -> Progress | LineProgress:
    """A progress display on `err`: a live bar on a terminal, plain lines in logs, nothing when quiet."""
    if not err.is_terminal:
        return LineProgress(err, disable=quiet())
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        disable=quiet(),
    )


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with progress (see `progress`)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress() as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)
