"""The `archs` workflow: the hand-written architecture table, or every tensor the paper's edit of one model
would change (planned with a probe direction; nothing is written)."""

from __future__ import annotations

import refusal_edit.workflows.defaults as defaults
from refusal_edit.arch import ARCHITECTURES, ArchSpec
from refusal_edit.checkpoint.layout import open_checkpoint
from refusal_edit.edits.plan import EditPlan
from refusal_edit.edits.preview import PlannedTensor, preview_ablation


def architectures() -> list[ArchSpec]:
    """The table's specs (derived types are not listed: they are derived on first use)."""
    return list(ARCHITECTURES.values())


def preview(model: str, keep_tied: bool = False) -> tuple[EditPlan, list[PlannedTensor]]:
    """The plan of an ablation of MODEL and its rows, without a direction or any output."""
    source = defaults.resolve_model(model)
    return preview_ablation(open_checkpoint(source.hf_dir), keep_tied=keep_tied)
