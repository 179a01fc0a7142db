"""Paths from the user and names read from files.

`read_text` reads a text file the user names (a template, a markers list) the one way: `~` expanded,
UTF-8 with an optional byte-order mark (editors on Windows write one), one clear line when it fails.

Names read from files (recipes, index files, headers) are data, not paths. A recipe or an index written
by someone else must never steer a write (or a read) outside the folder it belongs to: `../../x`, `/etc/x`
and `sub/x` are refused, and the final path is checked once more after symlinks are resolved.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from refusal_edit.errors import RefusalEditError

_PLAIN = re.compile(r"[^/\\\x00-\x1f]+")


def regular_file(path: str | Path, what: str) -> Path:
    """`path` (`~` expanded) if it is a regular file, else one line naming `what`: a directory, a FIFO (reading
    one would wait forever) or a device is refused before anything reads it."""
    p = Path(path).expanduser()
    if not p.exists():
        raise RefusalEditError(f"{what} not found: {p}")
    if p.is_dir():
        raise RefusalEditError(f"{what} is a directory, not a file: {p}")
    if not p.is_file():
        raise RefusalEditError(f"{what} is not a regular file: {p}")
    return p


def read_text(path: str | Path, what: str) -> str:
    """The text of the file `path` the user named as `what` (e.g. "template file"), BOM dropped."""
    p = regular_file(path, what)
    try:
        return p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise RefusalEditError(f"cannot read the {what} {p}: {exc}") from None


def plain_name(value: object, what: str) -> str:
    """`value` as a plain file name (no directory part, not `.` or `..`), else a clear error naming `what`."""
    if not isinstance(value, str):
        raise RefusalEditError(f"{what} must be a file name (a string), got {type(value).__name__}")
    if not value or value in (".", "..") or not _PLAIN.fullmatch(value) or len(value) > 255:
        raise RefusalEditError(f"{what} must be a plain file name without a directory part, got {value!r}")
    return value


def inside(folder: Path, name: str, what: str) -> Path:
    """`folder / name`, checked to stay inside `folder` once symlinks are resolved."""
    path = Path(folder) / plain_name(name, what)
    root = os.path.realpath(folder)
    real = os.path.realpath(path)
    if not real.startswith(root.rstrip(os.sep) + os.sep):
        raise RefusalEditError(f"{what} {name!r} resolves outside {folder}")
    return path


def is_within(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies inside it (both taken as given: resolve them first)."""
    return path == folder or folder in path.parents
