"""Write a directory atomically and safely: build it beside the target, rename at the end.

A killed or failed run leaves no half-written output (only a `.tmp-` sibling that the next run of the
same output removes), and a full disk becomes a one-line error instead of a traceback. Before anything
is written, the output is checked against what must never be deleted: the inputs of the run (the output
may not be an input, contain one, or lie inside one, symlinks resolved), the current directory, the home
directory and the filesystem root. `force` replaces only a previous output of this tool or an empty
directory; anything else needs `replace_any`. A lock file beside the output makes a second run to the
same output fail at once with a clear message instead of deleting the first run's temporary directory.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from refusal_edit.errors import RefusalEditError
from refusal_edit.interrupt import output_complete
from refusal_edit.paths import is_within

TMP_MARK = ".tmp-refusal-edit-"
LOCK_MARK = f"{TMP_MARK}lock"
# Files by which the tool's own outputs are recognised, each a JSON object stamped `"tool": "refusal-edit"`:
# an edited checkpoint's record, an extract run, an evaluation report; and a GGUF conversion's marker. Read
# here as stamps, not as records, so that atomic output (below everything that writes) asks no module above it.
_RUN_FILES = ("refusal_edit.json", "run.json", "report.json")
_CONVERSION_MARKER = "refusal_edit_source.json"


def is_previous_output(folder: Path) -> bool:
    """Whether `folder` was written by this tool (an edit record, an extract run, a conversion, a report)."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    if (folder / _CONVERSION_MARKER).is_file():
        return True
    for name in _RUN_FILES:
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("tool") == "refusal-edit":
            return True
    return False


def _ids(path: Path) -> set[tuple[int, int]]:
    """(device, inode) of `path` and of every existing ancestor: identity that survives bind mounts and
    case-insensitive names, where comparing resolved paths alone would not."""
    ids = set()
    for p in (path, *path.parents):
        with suppress(OSError):
            st = p.stat()
            ids.add((st.st_dev, st.st_ino))
    return ids


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def resolve_output(out: Path, inputs: Iterable[Path] = ()) -> Path:
    """The absolute output path, or a clear error when writing there could destroy something.

    Refused with or without `force`: an output that is one of `inputs`, contains one or lies inside one
    (after resolving symlinks), that is or contains the current directory, the home directory or the
    root, and an output path that is itself a symbolic link (replacing it would act on the link).
    """
    absolute = Path(os.path.abspath(out))
    if not absolute.name:
        raise RefusalEditError(f"output cannot be the filesystem root: {out}")
    if TMP_MARK in absolute.name:
        raise RefusalEditError(f"output name may not contain {TMP_MARK!r} (reserved for temporary folders): {out}")
    if absolute.is_symlink():
        raise RefusalEditError(f"output path is a symbolic link: {out}; give the folder it points to, or another path")
    target = absolute.parent.resolve() / absolute.name
    real = target.resolve()
    target_id = _identity(target)
    chain = _ids(target)
    for given in inputs:
        p = Path(os.path.abspath(given)).resolve()
        if real == p or (target_id is not None and target_id == _identity(p)):
            raise RefusalEditError(f"output {out} is the input {given}; the input is never modified")
        if is_within(p, real) or (target_id is not None and target_id in _ids(p)):
            raise RefusalEditError(f"output {out} contains the input {given}; replacing it would delete the input")
        if is_within(real, p) or _identity(p) in chain:
            raise RefusalEditError(f"output {out} is inside the input {given}; write it outside the input")
    for what, place in (("current directory", os.getcwd()), ("home directory", os.path.expanduser("~"))):
        place = Path(place).resolve()
        if is_within(place, real) or (target_id is not None and target_id in _ids(place)):
            raise RefusalEditError(f"output {out} is or contains the {what}; choose a dedicated folder")
    return target


@contextmanager
def _lock(target: Path) -> Iterator[None]:
    """Hold an exclusive lock file beside `target`; a second holder fails at once, and the file goes after."""
    lock = target.parent / f"{target.name}{LOCK_MARK}"
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RefusalEditError(f"cannot write to {target.parent}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RefusalEditError(
                f"another refusal-edit run is writing {target} right now; wait for it to finish or choose another "
                "output"
            ) from None
        except OSError:
            break  # a filesystem without locks (some network mounts): go on unlocked
        # The previous holder may have removed the file between our open and our lock: lock the current one.
        try:
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        with suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def _stale_siblings(out: Path) -> list[Path]:
    """Temporary directories of earlier runs to the same output that were killed (exactly the names this
    module creates: a user's folder that merely starts alike is never touched)."""
    parent = out.parent
    if not parent.is_dir():
        return []
    pattern = re.compile(re.escape(f"{out.name}{TMP_MARK}") + r"(old-)?[0-9a-f]{8}")
    return [p for p in parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]


def make_parents(folder: Path) -> list[Path]:
    """Create `folder` and missing ancestors; return those created (deepest first), to remove on failure."""
    created = []
    p = folder
    while not p.exists() and not p.is_symlink():
        created.append(p)
        p = p.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise RefusalEditError(f"cannot create {folder}: a file is in the way") from None
    except OSError as exc:
        raise RefusalEditError(f"cannot create {folder}: {exc.strerror}") from None
    return created


def _check_replaceable(out: Path, shown: Path, force: bool, replace_any: bool) -> None:
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise RefusalEditError(f"output path is a file, not a directory: {shown}")
    if not force:
        raise RefusalEditError(f"output exists: {shown} (`force` replaces it)")
    if replace_any:
        return
    try:
        empty = not any(out.iterdir())
    except OSError as exc:
        raise RefusalEditError(f"cannot read {shown}: {exc.strerror}") from None
    if not empty and not is_previous_output(out):
        raise RefusalEditError(
            f"refusing to replace {shown}: it is not empty and not an output of refusal-edit (`force` replaces "
            "only those; `replace_any` replaces anything)"
        )


def check_writable(folder: Path, shown: Path) -> None:
    """Whether a new entry can be made in `folder` (or in its nearest existing ancestor, where the missing
    folders would be created): found by making and removing an empty probe folder there, the only test that
    sees read-only mounts, permissions, quotas and ACLs alike. Run before any work, not after it."""
    anchor = Path(os.path.abspath(folder))
    while not anchor.exists() and anchor != anchor.parent:
        anchor = anchor.parent
    if not anchor.is_dir():
        raise RefusalEditError(f"cannot create {shown}: {anchor} is a file, not a folder")
    probe = anchor / f"{TMP_MARK}probe-{uuid.uuid4().hex[:8]}"
    try:
        os.mkdir(probe)
    except OSError as exc:
        raise RefusalEditError(f"cannot write {shown}: {exc.strerror or exc} (in {anchor}); nothing was done") from None
    with suppress(OSError):
        os.rmdir(probe)


def check_output(out: Path, force: bool = False, inputs: Iterable[Path] = (), replace_any: bool = False) -> Path:
    """Every check `atomic_dir` makes before writing, for a command to run before hours of work: the
    absolute output path, or the error the write would end with (a folder it cannot write in included)."""
    target = resolve_output(Path(out), inputs)
    _check_replaceable(target, Path(out), force, replace_any)
    check_writable(target.parent, Path(out))
    return target


def write_failure(exc: Exception, out: Path) -> RefusalEditError:
    """A write failure as one line: OSError by errno, a library's own error (safetensors' SafetensorError
    wraps the OS error in its text) by what it says."""
    if not isinstance(exc, OSError):
        text = str(exc)
        if "No space left" in text or "Disk quota" in text:
            return RefusalEditError(f"disk full while writing {out}; nothing was written")
        return RefusalEditError(f"failed to write {out}: {text.splitlines()[0] if text else type(exc).__name__}")
    if exc.errno == errno.ENOSPC:
        return RefusalEditError(f"disk full while writing {out}; nothing was written")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return RefusalEditError(f"cannot write {out}: {exc.strerror}; nothing was written")
    return RefusalEditError(f"failed to write {out}: {exc}; nothing was written")


@contextmanager
def atomic_dir(
    out: Path, force: bool = False, inputs: Iterable[Path] = (), replace_any: bool = False
) -> Iterator[Path]:
    """Yield an empty temporary directory that becomes `out` when the block succeeds.

    `out` must not exist unless `force` is set, and then it is replaced (only after the new content is
    complete) only if it is empty or a previous output of this tool, or `replace_any` is set. `inputs` are
    the paths the run reads: `out` may never be one, contain one or lie inside one. Any failure or
    interrupt (KeyboardInterrupt, or SIGTERM turned into an exception by `refusal_edit.interrupt`) removes
    the temporary directory and every folder this call created.
    """
    target = resolve_output(Path(out), inputs)
    _check_replaceable(target, Path(out), force, replace_any)  # early: before creating anything
    created = make_parents(target.parent)
    try:
        with _lock(target):
            _check_replaceable(target, Path(out), force, replace_any)  # again, now that we hold the lock
            for stale in _stale_siblings(target):
                shutil.rmtree(stale, ignore_errors=True)
            tmp = target.parent / f"{target.name}{TMP_MARK}{uuid.uuid4().hex[:8]}"
            try:
                tmp.mkdir()
            except OSError as exc:
                raise write_failure(exc, Path(out)) from None
            try:
                yield tmp
                _commit(tmp, target)
            except (OSError, *_library_write_errors()) as exc:
                raise write_failure(exc, Path(out)) from exc
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            output_complete(Path(out))
    except BaseException:
        for folder in created:  # deepest first; only folders that are still empty
            with suppress(OSError):
                folder.rmdir()
        raise


def _library_write_errors() -> tuple[type[Exception], ...]:
    """Write errors of libraries that do not raise OSError (safetensors: SafetensorError, "No space left")."""
    from safetensors import SafetensorError

    return (SafetensorError,)


def write_text(path: Path, text: str) -> Path:
    """Replace the file `path` by `text` (UTF-8) in one rename: a reader, a failure or an interrupt leaves
    the old file or the new one, never half of one (and no temporary file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise RefusalEditError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise
    return path


def _commit(tmp: Path, target: Path) -> None:
    """Move `tmp` into place; an existing output is swapped out first and restored if the move fails."""
    if not os.path.lexists(target):
        os.replace(tmp, target)
        return
    trash = target.parent / f"{target.name}{TMP_MARK}old-{uuid.uuid4().hex[:8]}"
    os.replace(target, trash)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(trash, target)
        raise
    shutil.rmtree(trash, ignore_errors=True)
