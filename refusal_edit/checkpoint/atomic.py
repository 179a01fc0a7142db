"""Write a directory atomically: build it beside the target, rename at the end.

A killed or failed run leaves no half-written output (only a `.tmp-` sibling that the next run of the
same output removes), and a full disk becomes a one-line error instead of a traceback.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from refusal_edit.errors import RefusalEditError

TMP_MARK = ".tmp-refusal-edit-"


def _stale_siblings(out: Path) -> list[Path]:
    parent = out.parent
    if not parent.is_dir():
        return []
    return [p for p in parent.iterdir() if p.name.startswith(f"{out.name}{TMP_MARK}")]


@contextmanager
def atomic_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory that becomes `out` when the block succeeds.

    `out` must not exist unless `force` is set, in which case it is replaced only after the new
    content is complete.
    """
    out = Path(out)
    if out.exists() and not force:
        raise RefusalEditError(f"output exists: {out} (pass --force to replace it)")
    if out.exists() and not out.is_dir():
        raise RefusalEditError(f"output path is a file, not a directory: {out}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RefusalEditError(f"cannot create {out.parent}: {exc.strerror}") from exc
    for stale in _stale_siblings(out):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f"{out.name}{TMP_MARK}{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            trash = out.parent / f"{out.name}{TMP_MARK}old-{uuid.uuid4().hex[:8]}"
            os.replace(out, trash)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise RefusalEditError(f"disk full while writing {out}; nothing was written") from exc
        raise RefusalEditError(f"failed to write {out}: {exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
