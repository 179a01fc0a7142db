"""What an edit plan does to a checkpoint, tensor by tensor, without writing anything.

`refusal-edit archs MODEL` and `orthogonalize --plan-only` show it, so that a user can check a new
architecture (or a large model) before spending disk: every tensor that would be edited or created,
the transform, the writer site and layer, and the sandwich norm whose gain changes the direction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from refusal_edit.arch import classify
from refusal_edit.checkpoint.layout import Checkpoint
from refusal_edit.edits.plan import EditPlan, as_source, layer_prefix, plan_ablation, resolved_config
from refusal_edit.edits.tensor_source import TensorSource


@dataclass(frozen=True)
class PlannedTensor:
    """One row of a plan preview. `kind` is the table's tensor kind (`linear`, `experts_t`, ...) or `new`."""

    name: str
    action: str
    kind: str
    site: str
    layer: int | None
    shape: tuple[int, ...]
    dtype: str
    norm: str | None = None
    note: str = ""


def _layer_of(name: str, layers: str) -> int | None:
    m = re.search(rf"(?:^|\.){re.escape(layers)}\.(\d+)\.", name)
    return int(m.group(1)) if m else None


SITE_ORDER = {"embedding": 0, "attn": 1, "mlp": 2, "": 3}


def planned_tensors(plan: EditPlan, ckpt: Checkpoint | TensorSource) -> list[PlannedTensor]:
    """Every tensor `plan` edits, in stream order (embeddings, then layer by layer, attention before MLP),
    then every tensor it creates."""
    source = as_source(ckpt)
    spec = plan.spec
    rows = []
    for info in source.infos():
        transform = plan.transforms.get(info.name)
        if transform is None:
            continue
        m = classify(spec, info.name)
        layer = m.layer if m is not None else _layer_of(info.name, spec.layers)
        site = m.rule.site if m is not None else ""
        norm = None
        if m is not None and m.layer is not None:
            suffixes = spec.post_norm_names(m.layer, m.rule.site, m.rule.module)
            norm = " * ".join(layer_prefix(info.name, spec, m.layer) + x for x in suffixes) or None
        kind = m.rule.kind if m is not None else "bias"
        rows.append(PlannedTensor(info.name, transform.label, kind, site, layer, tuple(info.shape), info.dtype, norm))
    rows.sort(key=lambda r: (-1 if r.layer is None else r.layer, SITE_ORDER[r.site], r.name))
    for new in plan.new:
        if new.source is not None:
            note = f"copy of {new.source}"
        else:
            note = "zeros" if new.transform is None else "zeros, then the vector"
        action = "create" if new.transform is None else f"create, {new.transform.label}"
        layer = _layer_of(new.name, spec.layers)
        rows.append(PlannedTensor(new.name, action, "new", "", layer, tuple(new.shape), new.dtype, None, note))
    return rows


def preview_ablation(ckpt: Checkpoint | TensorSource, keep_tied: bool = False) -> tuple[EditPlan, list[PlannedTensor]]:
    """The plan of the paper's edit for this checkpoint, with a probe direction (which tensors change does
    not depend on the direction, except where a sandwich norm's gain is zero along all of it)."""
    source = as_source(ckpt)
    hidden = int(resolved_config(source).hidden_size)
    plan = plan_ablation(source, torch.ones(hidden), keep_tied=keep_tied)
    return plan, planned_tensors(plan, source)
