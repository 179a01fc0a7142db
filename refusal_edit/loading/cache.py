"""Where converted models and fetched files are cached, and how files are hashed."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def cache_root() -> Path:
    """`$REFUSAL_EDIT_CACHE`, else `$XDG_CACHE_HOME/refusal-edit`, else `~/.cache/refusal-edit`."""
    env = os.environ.get("REFUSAL_EDIT_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "refusal-edit"


def sha256_file(path: Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def cached_sha256(path: Path) -> str:
    """sha256 of a large file, remembered by (path, size, mtime) so a second load does not re-read it."""
    index_file = cache_root() / "sha256-index.json"
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        index = {}
    if key in index:
        return index[key]
    digest = sha256_file(path)
    index[key] = digest
    try:
        index_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = index_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(index, indent=0))
        tmp.replace(index_file)
    except OSError:
        pass  # a read-only cache only costs a re-hash next time
    return digest
