"""The weight edit applied to a model loaded in memory, with the same plan and the same chunk transforms.

This is what `tune` uses for edits that have no hook twin (norm preservation): the loaded model's
parameters are presented as a `TensorSource`, planned exactly like a checkpoint on disk, edited in place
for the duration of a `with` block and restored afterwards. A tied output head is untied for the block
(the original matrix stays the head), as the file edit does by default.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from refusal_edit.checkpoint.safetensors_io import CODE_OF, TensorInfo
from refusal_edit.edits.ops import apply_whole
from refusal_edit.edits.plan import plan_edit
from refusal_edit.edits.spec import WriterBases
from refusal_edit.errors import RefusalEditError


class ModelTensors:
    """A loaded model's parameters as a `TensorSource` (names as in its state dict)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.config: dict[str, Any] = model.config.to_dict()
        self.root: Path | None = None

    def _info(self, name: str, p: torch.Tensor) -> TensorInfo:
        code = CODE_OF.get(p.dtype, "F32")
        return TensorInfo(name, code, tuple(p.shape), 0, p.numel() * p.element_size())

    def infos(self) -> Iterable[TensorInfo]:
        for name, p in self.params.items():
            yield self._info(name, p)

    def find(self, name: str) -> TensorInfo | None:
        p = self.params.get(name)
        return None if p is None else self._info(name, p)

    def read(self, name: str) -> torch.Tensor:
        return self.params[name].detach().float().cpu()


def _untie_head(model: nn.Module) -> nn.Parameter | None:
    """Give the output head its own copy of a tied matrix; returns the shared parameter to restore."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or emb is None or head.weight is not emb.weight:
        return None
    shared = head.weight
    head.weight = nn.Parameter(shared.detach().clone(), requires_grad=False)
    return shared


@contextmanager
def edited_weights(model: nn.Module, edit: WriterBases) -> Iterator[list[str]]:
    """Edit the model's residual writers in place for the block; yields the edited parameter names."""
    if getattr(model, "is_quantized", False):
        raise RefusalEditError(
            "norm preservation edits the weights in memory, and this model's are quantized (`load_in`): "
            "load it unquantized for that edit"
        )
    source = ModelTensors(model)
    plan = plan_edit(source, edit)
    if plan.new:
        unexpected = [t.name for t in plan.new if t.source is None]
        if unexpected:
            raise RefusalEditError(f"an in-memory edit cannot create tensors: {', '.join(unexpected)}")
    shared = _untie_head(model) if plan.config and plan.config.get("tie_word_embeddings") is False else None
    backups: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name, transform in plan.transforms.items():
                p = source.params[name]
                backups[name] = p.detach().clone()
                work = p.detach().float().clone()
                apply_whole(transform, work)
                p.copy_(work.to(p.dtype))
        yield list(plan.transforms)
    finally:
        with torch.no_grad():
            for name, saved in backups.items():
                source.params[name].copy_(saved)
        if shared is not None:
            model.get_output_embeddings().weight = shared
