"""Secrets in the files of a push, found by content whatever the file is called.

A model folder is where people also keep `token.txt`, a `.env` copied into a card, or a key pasted into a
config; the allow list keeps most such files local by name, and this scan refuses a push when any file
that would go up holds one anyway. Patterns are the providers' documented token shapes (prefixes and
lengths), so ordinary model text (vocabularies, cards, configs) does not match: the real tokenizers of the
demo models scan clean (tests/test_push.py). Files are streamed in blocks; of weight files only the
header is read (a safetensors JSON header with its metadata, a GGUF's metadata before the tensor data):
their bodies are numbers, and reading gigabytes of them would find nothing but chance.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from pathlib import Path

BLOCK = 1 << 20
OVERLAP = 1 << 12  # a secret straddling two blocks is found in the overlap (every pattern is shorter)
GGUF_METADATA_LIMIT = 256 << 20  # a GGUF whose metadata cannot be parsed: scan this much of its start

# (what it is, a literal every match contains, pattern, whether it runs on the lower-cased block). The
# literal gates the pattern (a block without it is not searched) and, where it is common, leads it (Python's
# regex engine then jumps between its occurrences; lookbehinds after it keep a match from being the middle
# of a longer identifier). Keys that are case-insensitive (AWS_SECRET_ACCESS_KEY) run lower-cased.
_NOT_BEFORE = rb"(?<![A-Za-z0-9]"
SECRET_PATTERNS: tuple[tuple[str, bytes, re.Pattern[bytes], bool], ...] = tuple(
    (what, anchor, re.compile(pattern), folded)
    for what, anchor, pattern, folded in (
        ("a Hugging Face token", b"hf_", rb"hf_" + _NOT_BEFORE + rb"hf_)[A-Za-z0-9]{30,40}(?![A-Za-z0-9])", False),
        ("a Hugging Face token", b"api_org_", rb"api_org_[A-Za-z0-9]{30,40}(?![A-Za-z0-9])", False),
        ("a private key", b"PRIVATE KEY", rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----", False),
        ("a private key", b"PuTTY-User-Key-File-", rb"PuTTY-User-Key-File-\d+: ", False),
        ("an AWS access key id", b"A", rb"A(?:KIA|SIA|BIA|CCA)(?<![A-Z0-9]A...)[A-Z2-7]{16}(?![A-Z0-9])", False),
        (
            "an AWS secret access key",
            b"aws_secret_access_key",
            rb"aws_secret_access_key[\"']?\s*[=:]\s*[\"']?[a-z0-9/+]{40}",
            True,
        ),
        (
            "a Google Cloud service-account key",
            b"service_account",
            rb'\\?"type\\?"\s*:\s*\\?"service_account\\?"',
            False,
        ),
        ("a Google API key", b"AIza", rb"AIza" + _NOT_BEFORE + rb"AIza)[0-9A-Za-z_\-]{35}(?![A-Za-z0-9_\-])", False),
        ("a GitHub token", b"gh", rb"gh[pousr]_" + _NOT_BEFORE + rb"gh._)[A-Za-z0-9]{36}", False),
        ("a GitHub token", b"github_pat_", rb"github_pat_[A-Za-z0-9_]{60,}", False),
        (
            "an OpenAI or Anthropic API key",
            b"sk-",
            rb"sk-" + _NOT_BEFORE + rb"sk-)(?:proj-|ant-[a-z]+\d\d-)?[A-Za-z0-9_\-]{40,}",
            False,
        ),
        ("a Slack token", b"xox", rb"xox[abposr]-" + _NOT_BEFORE + rb"xox.-)[0-9]{6,}-[A-Za-z0-9-]{6,}", False),
        ("a Weights & Biases API key", b"wandb_api_key", rb"wandb_api_key[\"']?\s*[=:]\s*[\"']?[0-9a-f]{40}", True),
    )
)
_GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _gguf_metadata_end(path: Path) -> int:
    """Where a GGUF's metadata (key-values and tensor infos) ends: the format's own layout, read with seeks
    (gguf-py's reader builds every array and takes a minute for a large vocabulary)."""
    with open(path, "rb") as fh:

        def number(fmt: str) -> int:
            size = struct.calcsize(fmt)
            data = fh.read(size)
            if len(data) != size:
                raise ValueError("truncated")
            return struct.unpack(fmt, data)[0]

        def skip_value(kind: int) -> None:
            if kind in _GGUF_SCALARS:
                fh.seek(_GGUF_SCALARS[kind], 1)
            elif kind == _GGUF_STRING:
                fh.seek(number("<Q"), 1)
            elif kind == _GGUF_ARRAY:
                inner, count = number("<I"), number("<Q")
                if inner in _GGUF_SCALARS:
                    fh.seek(_GGUF_SCALARS[inner] * count, 1)
                else:
                    for _ in range(count):
                        skip_value(inner)
            else:
                raise ValueError(f"unknown GGUF value type {kind}")

        if fh.read(4) != b"GGUF":
            raise ValueError("not a GGUF file")
        number("<I")  # version
        n_tensors, n_kv = number("<Q"), number("<Q")
        for _ in range(n_kv):
            fh.seek(number("<Q"), 1)  # key
            skip_value(number("<I"))
        for _ in range(n_tensors):
            fh.seek(number("<Q"), 1)  # name
            fh.seek(8 * number("<I") + 4 + 8, 1)  # dims, type, offset
        return fh.tell()


def _header_end(path: Path) -> int | None:
    """How many leading bytes of a weight file are metadata (None: not a weight file, scan it all)."""
    name = path.name.lower()
    if name.endswith(".safetensors"):
        with open(path, "rb") as fh:
            head = fh.read(8)
        return 8 + struct.unpack("<Q", head)[0] if len(head) == 8 else None
    if name.endswith(".gguf"):
        try:
            return _gguf_metadata_end(path)
        except (ValueError, struct.error, OverflowError):  # not readable as GGUF: scan its start
            return GGUF_METADATA_LIMIT
    return None


def _blocks(path: Path, limit: int | None) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) blocks of the file's first `limit` bytes (all of it for None), overlapping."""
    with open(path, "rb") as fh:
        start, tail = 0, b""
        while limit is None or start < limit:
            data = fh.read(BLOCK if limit is None else min(BLOCK, limit - start))
            if not data:
                return
            yield start - len(tail), tail + data
            start += len(data)
            tail = (tail + data)[-OVERLAP:]


def _search(data: bytes) -> tuple[str, int] | None:
    """(what, offset) of the first secret found in `data` (pattern by pattern), or None."""
    lower = None
    for what, anchor, pattern, folded in SECRET_PATTERNS:
        hay = data
        if folded:
            lower = data.lower() if lower is None else lower
            hay = lower
        if anchor in hay:
            match = pattern.search(hay)
            if match:
                return what, match.start()
    return None


def find_secret(data: bytes) -> str | None:
    """What kind of secret `data` (a generated file) holds, or None."""
    hit = _search(data)
    return hit[0] if hit else None


def scan_file(path: Path) -> tuple[str, int] | None:
    """(what, line number) of the first secret in the file, or None. Weight files: their header only."""
    limit = _header_end(path)
    lines = 1
    seen = 0  # bytes already counted for line numbers
    for offset, data in _blocks(path, limit):
        hit = _search(data)
        if hit:
            what, start = hit
            fresh_at = seen - offset  # where this block's unread bytes start
            if start >= fresh_at:
                return what, lines + data[fresh_at:start].count(b"\n")
            return what, lines - data[start:fresh_at].count(b"\n")
        lines += data[seen - offset :].count(b"\n")
        seen = offset + len(data)
    return None
