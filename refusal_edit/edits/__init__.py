"""Permanent weight edits: orthogonalization (ablate) and baked activation addition (add).

`plan_edit` / `plan_addition` decide what changes (an `EditPlan`, from the checkpoint's tensor list alone);
`write_checkpoint` streams the edited checkpoint out. Resolving MODEL, building the edit record and the
model card and choosing the output are the workflow's (`refusal_edit.workflows.editing`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from refusal_edit.edits.plan import EditPlan
from refusal_edit.edits.spec import MODES, EditSpec
from refusal_edit.edits.write import WriteResult, write_checkpoint
from refusal_edit.errors import RefusalEditError

__all__ = [
    "MODES",
    "EditResult",
    "EditSpec",
    "parse_size",
    "write_checkpoint",
]


@dataclass
class EditResult:
    write: WriteResult
    plan: EditPlan


_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMGT]i?B|B)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}
MAX_SIZE = 1 << 60  # far above any disk: larger values are typos, and float overflow starts beyond


def parse_size(text: str | int | None) -> int | None:
    """'5GB' / '500MB' / '1.5GiB' / '1024' -> bytes (decimal units as in transformers); None stays None.

    A positive, finite size or a clear error naming `max_shard_size`: `0`, `-5GB`, `1e400MB`, `infGB`,
    `5XB` are refused.
    """
    if text is None:
        return None
    if isinstance(text, int):
        value = float(text)
    else:
        match = _SIZE.fullmatch(str(text))
        if match is None:
            raise RefusalEditError(f"cannot read `max_shard_size` {text!r} (a positive size, e.g. 5GB, 500MB)")
        value = float(match[1]) * _UNITS[(match[2] or "").upper()]
    if not math.isfinite(value) or value > MAX_SIZE:
        raise RefusalEditError(f"`max_shard_size` {text!r} is too large")
    if value < 1:
        raise RefusalEditError(f"`max_shard_size` must be positive, got {text!r}")
    return int(value)
