"""Instruction sets: the built-in harmful / harmless sets and users' own files or HF datasets.

Sources accepted by `load_prompts`:
- `builtin:harmful`, `builtin:harmless`, `builtin:borderline` (optionally `@train|val|test`);
- a file: `.txt` (one instruction per line), `.json` (a list of strings or of objects), `.jsonl`,
  `.csv`, `.parquet` (the column is `#name` if given, else the first of `COLUMNS` present); `FILE@test`
  (or `@train`, `@val`) is that split of it, the one extract uses;
- `hf:NAME[@SPLIT][#COLUMN]` for a Hugging Face `datasets` dataset (a Hub id or a local path).

A `category` column, if present, is kept (per-category refusal rates); a `split` column is respected, and
a set without one is split 70/15/15 (train / val / test) by a hash of each prompt (`HASH_SPLIT`).
Files are read as UTF-8 with an optional byte-order mark (`utf-8-sig`): editors on Windows write one, and
it must not end up inside the first prompt or hide the first CSV column's name.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from refusal_edit.errors import RefusalEditError
from refusal_edit.paths import regular_file

COLUMNS = ("instruction", "prompt", "goal", "behavior", "question", "text", "query")
SPLITS = ("train", "val", "test")
BUILTIN_SETS = ("harmful", "harmless", "borderline")
HASH_SPLIT = "70/15/15 (train/val/test) by a hash of each prompt"
ENCODING = "utf-8-sig"  # UTF-8, dropping a leading byte-order mark


@dataclass
class PromptSet:
    """An ordered list of instructions with optional categories and split labels."""

    source: str
    instructions: list[str]
    categories: list[str] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.categories:
            self.categories = [""] * len(self.instructions)
        if not self.splits:
            self.splits = [""] * len(self.instructions)

    def __len__(self) -> int:
        return len(self.instructions)

    @property
    def sha256(self) -> str:
        return hashlib.sha256("\n".join(self.instructions).encode()).hexdigest()

    def subset(self, indices: list[int], source: str | None = None) -> PromptSet:
        return PromptSet(
            source or self.source,
            [self.instructions[i] for i in indices],
            [self.categories[i] for i in indices],
            [self.splits[i] for i in indices],
        )

    @property
    def hash_split(self) -> bool:
        """Whether `split` divides this set by a hash of each prompt (it has no split labels of its own)."""
        return not any(self.splits)

    def split_counts(self) -> dict[str, int]:
        """Rows per split (train, val, test), as `split` divides them."""
        labels = self.splits if any(self.splits) else [_hash_split(i) for i in self.instructions]
        return {name: labels.count(name) for name in SPLITS}

    def split(self, name: str) -> PromptSet:
        """The rows labelled `name`; unlabelled sets are split by a stable hash (70/15/15)."""
        labels = self.splits if any(self.splits) else [_hash_split(i) for i in self.instructions]
        rows = [i for i, s in enumerate(labels) if s == name]
        return self.subset(rows, f"{self.source}@{name}")

    def sample(self, n: int | None) -> PromptSet:
        """The first `n` rows taken round-robin over categories, so small subsets stay balanced."""
        if n is None or n >= len(self):
            return self
        by_cat: dict[str, list[int]] = {}
        for i, c in enumerate(self.categories):
            by_cat.setdefault(c, []).append(i)
        queues = list(by_cat.values())
        rows: list[int] = []
        depth = 0
        while len(rows) < n:
            rows += [q[depth] for q in queues if depth < len(q)][: n - len(rows)]
            depth += 1
        return self.subset(rows, f"{self.source}[:{n}]")

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "count": len(self), "sha256": self.sha256}


def _hash_split(text: str) -> str:
    bucket = int(hashlib.sha256(text.encode()).hexdigest(), 16) % 100
    return "train" if bucket < 70 else "val" if bucket < 85 else "test"


def _rows_to_set(source: str, rows: list[Any], column: str | None) -> PromptSet:
    if rows and all(isinstance(r, str) for r in rows):
        return _finish(source, [str(r) for r in rows], [], [])
    if not rows or not all(isinstance(r, dict) for r in rows):
        raise RefusalEditError(f"{source}: expected a list of strings or of objects")
    keys = set().union(*(r.keys() for r in rows))
    col = column or next((c for c in COLUMNS if c in keys), None)
    if col is None and len(keys) == 1:
        col = next(iter(keys))
    if col is None or col not in keys:
        want = column or " / ".join(COLUMNS)
        raise RefusalEditError(f"{source}: no column {want!r}; columns are {', '.join(sorted(keys))}")
    texts = [str(r.get(col) or "") for r in rows]
    cats = [str(r.get("category") or "") for r in rows] if "category" in keys else []
    splits = [str(r.get("split") or "") for r in rows] if "split" in keys else []
    return _finish(source, texts, cats, splits)


def _finish(source: str, texts: list[str], cats: list[str], splits: list[str]) -> PromptSet:
    keep = [i for i, t in enumerate(texts) if t.strip()]
    if not keep:
        raise RefusalEditError(f"{source}: no instructions found (empty prompt set)")
    return PromptSet(
        source,
        [texts[i].strip() for i in keep],
        [cats[i] for i in keep] if cats else [],
        [splits[i] for i in keep] if splits else [],
    )


def _read_file(path: Path, column: str | None) -> PromptSet:
    src = str(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            return _finish(src, path.read_text(encoding=ENCODING).splitlines(), [], [])
        if suffix == ".json":
            data = json.loads(path.read_text(encoding=ENCODING))
            if isinstance(data, dict):  # {"instructions": [...]} or {"data": [...]}
                lists = [v for v in data.values() if isinstance(v, list)]
                if len(lists) != 1:
                    raise RefusalEditError(f"{src}: expected a JSON list (or an object holding one list)")
                data = lists[0]
            return _rows_to_set(src, data, column)
        if suffix == ".jsonl":
            lines = [ln for ln in path.read_text(encoding=ENCODING).splitlines() if ln.strip()]
            return _rows_to_set(src, [json.loads(ln) for ln in lines], column)
        if suffix == ".csv":
            with path.open(newline="", encoding=ENCODING) as fh:
                return _rows_to_set(src, list(csv.DictReader(fh)), column)
        if suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError as exc:
                raise RefusalEditError("reading .parquet needs pyarrow: pip install pyarrow") from exc
            return _rows_to_set(src, pq.read_table(path).to_pylist(), column)
    except RefusalEditError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise RefusalEditError(f"cannot read prompts from {src}: {exc}") from exc
    raise RefusalEditError(f"{src}: unsupported prompt file type {suffix!r} (txt, json, jsonl, csv, parquet)")


def _read_hf(spec: str) -> PromptSet:
    rest = spec[len("hf:") :]
    column = None
    split = "train"
    if "#" in rest:
        rest, column = rest.split("#", 1)
    if "@" in rest:
        rest, split = rest.split("@", 1)
    try:
        import datasets
    except ImportError as exc:
        raise RefusalEditError("hf: prompt sources need the datasets package: pip install datasets") from exc
    try:
        ds = datasets.load_dataset(rest, split=split)
    except Exception as exc:
        raise RefusalEditError(f"cannot load dataset {rest!r} split {split!r}: {exc}") from exc
    return _rows_to_set(spec, ds.to_list(), column)


def builtin(kind: str) -> PromptSet:
    """A built-in set with fixed splits (data/README.md): `harmful` and `harmless` (400 instructions each,
    10 categories), `borderline` (160 harmless requests that sound harmful, 10 categories: over-refusal)."""
    if kind not in BUILTIN_SETS:
        raise RefusalEditError(f"unknown built-in set {kind!r} ({', '.join(BUILTIN_SETS)})")
    text = resources.files("refusal_edit.prompts").joinpath("data", f"{kind}.jsonl").read_text("utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return _rows_to_set(f"builtin:{kind}", rows, "instruction")


def load_prompts(spec: str) -> PromptSet:
    """Load a prompt set from any supported source (see module docstring)."""
    if spec.startswith("builtin:"):
        name, _, split = spec[len("builtin:") :].partition("@")
        ps = builtin(name)
        return ps.split(split) if split else ps
    if spec.startswith("hf:"):
        return _read_hf(spec)
    path_part, _, column = spec.partition("#")
    stem, at, split = path_part.rpartition("@")
    if at and split in SPLITS and not Path(path_part).exists():  # FILE@test: the part extract held out
        return _read_file(regular_file(stem, "prompt file"), column or None).split(split)
    return _read_file(regular_file(path_part, "prompt file"), column or None)


def prompt_set(prompts: Sequence[str]) -> str:
    """A short hash naming a list of prompts (in order): two points' per-prompt outcomes pair up only on the
    same list, and kept means are reused only for the prompts they came from."""
    return hashlib.sha256("\x00".join(prompts).encode()).hexdigest()[:16]
