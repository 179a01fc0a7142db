"""Edits written as adapters instead of new weights: a PEFT LoRA (`peft`) and a llama.cpp LoRA GGUF
(`refusal_edit.gguf.lora`), both from the plan's low-rank form (`refusal_edit.edits.lowrank`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class AdapterResult:
    """A written adapter: its rank, what it targets, its size; with a checkpoint write's counts, so the command
    line shows every output alike."""

    out: Path
    rank: int
    targets: list[str]
    bytes_written: int
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    edited: int = 0
    copied: int = 0
    created: int = 0
    warnings: list[str] = field(default_factory=list)
