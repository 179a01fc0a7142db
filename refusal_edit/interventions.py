"""Run-time interventions with hooks: directional ablation (any edit variant) and activation addition.

`edit_hooks` is the in-memory twin of the weight edit: it removes `alpha` x the span of each writer's
basis from the output of every module that writes into the residual stream (embeddings, attention or
its hybrid alternatives, MLP / MoE block). On sandwich-norm architectures the projection happens before
the post-projection norm, against `linalg.sandwich(basis, g)`, which is exactly what editing the
projection weights does. Projections are linear, so partial weights and subspaces stay exact. The
exactness tests compare edited checkpoints against these hooks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from refusal_edit.anatomy import anatomy
from refusal_edit.edits.memory import edited_weights
from refusal_edit.edits.spec import DirectionBank, EditSpec, WriterBases, full_ablation, resolve
from refusal_edit.errors import RefusalEditError
from refusal_edit.linalg import sandwich, unit

__all__ = ["Intervention", "RowGroups", "ablation", "addition", "applied", "edit_hooks", "edit_hooks_by_row", "unit"]


def _project(x: torch.Tensor, q: torch.Tensor, alpha: float) -> torch.Tensor:
    qq = q.to(device=x.device)
    xf = x.float()
    return (xf - alpha * (xf @ qq.T) @ qq).to(x.dtype)


def _projection_hook(q: torch.Tensor, alpha: float):
    cache: dict[torch.device, torch.Tensor] = {}

    def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
        first = output[0] if isinstance(output, tuple) else output
        if not isinstance(first, torch.Tensor):
            raise RefusalEditError("unexpected model output type at a residual writer")
        basis = cache.get(first.device)
        if basis is None:  # moved once per device (accelerate may place layers anywhere)
            basis = cache[first.device] = q.to(first.device)
        projected = _project(first, basis, alpha)
        return (projected, *output[1:]) if isinstance(output, tuple) else projected

    return hook


@contextmanager
def edit_hooks(model: nn.Module, edit: WriterBases) -> Iterator[None]:
    """Apply `edit` to every residual writer's output while the context is active (the weight edit's twin)."""
    if edit.preserve_norm:
        raise RefusalEditError(
            "norm preservation rescales weights per input unit and has no activation-hook twin; "
            "apply it to the weights (refusal_edit.edits.memory.edited_weights)"
        )
    anat = anatomy(model)
    if edit.n_layers != anat.num_layers:
        raise RefusalEditError(f"the edit is for {edit.n_layers} layers, the model has {anat.num_layers}")
    hidden = edit.bases["embedding", None].shape[-1]
    if hidden != anat.hidden_size:
        raise RefusalEditError(f"direction has size {hidden}, the model's hidden size is {anat.hidden_size}")
    handles = []
    try:
        for writer in anat.writers():
            basis, alpha = edit.at(writer.site, writer.layer)
            q = sandwich(basis, writer.gain)
            if alpha == 0 or q.shape[0] == 0:
                continue
            handles.append(writer.module.register_forward_hook(_projection_hook(q, alpha)))
        yield
    finally:
        for h in handles:
            h.remove()


class RowGroups:
    """Which edit each row of the batch in flight belongs to: `edit_hooks_by_row` applies a different edit
    to each group of rows in one forward pass (several front points generated in one batch)."""

    def __init__(self, groups: Sequence[int]) -> None:
        self.groups = torch.tensor(list(groups), dtype=torch.long)
        self.current: torch.Tensor = self.groups

    def select(self, rows: Sequence[int]) -> None:
        """The next batch holds these rows (indices into `groups`), in this order."""
        self.current = self.groups[list(rows)]


@contextmanager
def edit_hooks_by_row(model: nn.Module, edits: Sequence[WriterBases | None], rows: RowGroups) -> Iterator[None]:
    """Like `edit_hooks`, with `edits[g]` applied to the rows of group g (None: no edit for that group)."""
    anat = anatomy(model)
    if any(e is not None and e.preserve_norm for e in edits):
        raise RefusalEditError("norm preservation has no activation-hook twin; it cannot share a batch")
    handles = []
    try:
        for writer in anat.writers():
            parts = []
            for g, edit in enumerate(edits):
                if edit is None:
                    continue
                basis, alpha = edit.at(writer.site, writer.layer)
                q = sandwich(basis, writer.gain)
                if alpha != 0 and q.shape[0]:
                    parts.append((g, q, alpha))
            if not parts:
                continue

            def hook(_module: nn.Module, _args: Any, output: Any, parts=parts) -> Any:
                first = output[0] if isinstance(output, tuple) else output
                current = rows.current.to(first.device)
                if current.numel() != first.shape[0]:
                    raise RefusalEditError("row groups do not match the batch (call `select` before each batch)")
                result = first.clone()
                for g, q, alpha in parts:
                    mask = current == g
                    if mask.any():
                        result[mask] = _project(first[mask], q, alpha)
                return (result, *output[1:]) if isinstance(output, tuple) else result

            handles.append(writer.module.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def ablation(model: nn.Module, direction: torch.Tensor) -> Iterator[None]:
    """Project `direction` off every residual writer's output while the context is active (the paper's edit)."""
    anat = anatomy(model)
    r = unit(direction)
    if r.numel() != anat.hidden_size:
        raise RefusalEditError(f"direction has size {r.numel()}, the model's hidden size is {anat.hidden_size}")
    with edit_hooks(model, full_ablation(r, anat.num_layers)):
        yield


@contextmanager
def addition(
    model: nn.Module, vector: torch.Tensor, layer: int, coeff: float = 1.0, site: str = "input"
) -> Iterator[None]:
    """Add `coeff * vector` to the residual stream at every position while the context is active.

    site "input": at the input of `layer` (the paper's activation addition). site "attn": right after
    `layer`'s attention writes (before its MLP) - where an attention output bias adds it.
    """
    anat = anatomy(model)
    if not 0 <= layer < anat.num_layers:
        raise RefusalEditError(f"layer {layer} is out of range: the model has {anat.num_layers} layers")
    v = vector.detach().float() * coeff
    if v.numel() != anat.hidden_size:
        raise RefusalEditError(f"vector has size {v.numel()}, the model's hidden size is {anat.hidden_size}")

    def pre_hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            h = args[0]
            return (h + v.to(device=h.device, dtype=h.dtype), *args[1:]), kwargs
        h = kwargs["hidden_states"]
        kwargs = {**kwargs, "hidden_states": h + v.to(device=h.device, dtype=h.dtype)}
        return args, kwargs

    if site == "input":
        handle = anat.layers[layer].register_forward_pre_hook(pre_hook, with_kwargs=True)
    elif site == "attn":
        module, scale = anat.attention_write(layer)
        w = v / scale

        def post_hook(_module: nn.Module, _args: Any, output: Any) -> Any:
            if isinstance(output, tuple):
                return (output[0] + w.to(device=output[0].device, dtype=output[0].dtype), *output[1:])
            return output + w.to(device=output.device, dtype=output.dtype)

        handle = module.register_forward_hook(post_hook)
    else:
        raise RefusalEditError(f"unknown site {site!r} (input, attn)")
    try:
        yield
    finally:
        handle.remove()


def applied(model: nn.Module, edit: WriterBases | None) -> AbstractContextManager[object]:
    """Resolved bases on a loaded model: hooks where a hook twin exists, else the weights edited in place."""
    if edit is None:
        return nullcontext()
    return edited_weights(model, edit) if edit.preserve_norm else edit_hooks(model, edit)


@dataclass(frozen=True)
class Intervention:
    """An `EditSpec` applied by hooks (or, for norm preservation, to the weights in memory): the in-memory twin
    of the edit orthogonalize writes, and what reports record of it (`describe`).

    `vector` is what the spec's mode uses (`DirectionFile.edit_vector`): the direction an ablation removes, or
    the vector an addition adds (before `spec.coeff`) at `spec.layer`; `bank` holds the candidates an ablation
    variant draws on (None: `vector` alone).
    """

    spec: EditSpec
    vector: torch.Tensor
    bank: DirectionBank | None = None

    @property
    def vector_norm(self) -> float:
        """The norm of what is removed (1: a unit direction) or added (`coeff` x the vector)."""
        return float(self.vector.float().norm() * abs(self.spec.coeff))

    def bases(self, n_layers: int) -> WriterBases:
        """An ablation's basis and weight per writer site (what the planner and the hooks apply)."""
        if self.spec.mode != "ablate":
            raise RefusalEditError("an addition has no writer bases (it adds a vector)")
        return resolve(self.spec, self.bank if self.bank is not None else DirectionBank(self.vector), n_layers)

    @contextmanager
    def apply(self, model: nn.Module) -> Iterator[None]:
        spec = self.spec.check()
        if spec.mode == "add":
            if spec.layer is None:
                raise RefusalEditError("an addition needs a layer")
            with addition(model, self.vector, spec.layer, spec.coeff, spec.site or "input"):
                yield
        else:
            with applied(model, self.bases(anatomy(model).num_layers)):
                yield

    def describe(self) -> dict[str, Any]:
        spec = self.spec
        out = {"kind": spec.mode, "layer": spec.layer, "coeff": spec.coeff, "site": spec.site or "input"}
        if spec.is_variant:
            out["spec"] = spec.to_json()
        return out
