"""Record one forward pass of a tiny model: every module's input and output, and what each layer adds.

Only what ends in the hidden size matters: those outputs are the candidates for what a decoder layer
adds into the residual stream. Inputs are kept (cloned) so that a module can be run again on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from refusal_edit.errors import RefusalEditError


@dataclass
class Call:
    """One module's first call: its inputs (for replay) and first input / output as rows [N, H] (float64)."""

    name: str  # relative to the decoder layer, or to the layer list's parent for siblings
    module: nn.Module
    order: int
    args: tuple
    kwargs: dict[str, Any]
    inp: torch.Tensor | None
    out: torch.Tensor | None
    raw_out: Any = None


@dataclass
class Recording:
    hidden_shape: tuple[int, ...]
    layer_in: list[torch.Tensor]
    layer_out: list[torch.Tensor]
    layer_order: list[int]
    calls: list[dict[str, Call]]  # per layer: descendant name -> call
    siblings: dict[str, Call] = field(default_factory=dict)


def _first(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    last = getattr(value, "last_hidden_state", None)
    return last if isinstance(last, torch.Tensor) else None


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    if isinstance(value, list):
        return [_clone(v) for v in value]
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def rows(t: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor | None:
    """`t` as [N, H] float64 rows aligned with the hidden states of `shape` (broadcast if needed), else None."""
    if t is None or not t.is_floating_point() or t.dim() == 0 or t.shape[-1] != shape[-1]:
        return None
    n = 1
    for s in shape[:-1]:
        n *= s
    if t.numel() == n * shape[-1]:
        return t.detach().reshape(n, shape[-1]).double()
    try:
        return t.detach().expand(shape).reshape(n, shape[-1]).double()
    except RuntimeError:
        return None


def _input_tensor(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for key in ("hidden_states", "hidden_state", "x", "input", "input_ids"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    return None


def token_ids(vocab: int, seed: int = 1, batch: int = 2, length: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, max(vocab, 4), (batch, length), generator=g)


def run(model: nn.Module, ids: torch.Tensor) -> Any:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False)


def record(model: nn.Module, layers_name: str, ids: torch.Tensor) -> Recording:
    """One forward pass with every module of the layers' parent hooked (first call of each kept)."""
    layers = model.get_submodule(layers_name)
    parent_name = layers_name.rsplit(".", 1)[0] if "." in layers_name else ""
    parent = model.get_submodule(parent_name)
    list_attr = layers_name.rsplit(".", 1)[-1]
    n = len(layers)
    raw: dict[int, dict[str, Call]] = {i: {} for i in range(n)}
    siblings: dict[str, Call] = {}
    bounds: dict[int, list] = {}
    counter = [0]
    handles = []

    def hook_for(store: dict[str, Call], name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            counter[0] += 1
            if name in store:
                return
            store[name] = Call(
                name,
                module,
                counter[0],
                _clone(args),
                _clone(kwargs),
                _input_tensor(args, kwargs),
                None,
                _clone(output),
            )

        return hook

    def layer_pre(i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            counter[0] += 1
            if i not in bounds:
                bounds[i] = [_input_tensor(args, kwargs).detach().clone(), None, counter[0]]

        return hook

    def layer_post(i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if bounds[i][1] is None:
                bounds[i][1] = _first(output).detach().clone()

        return hook

    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(layer_pre(i), with_kwargs=True))
            handles.append(layer.register_forward_hook(layer_post(i), with_kwargs=True))
            for name, module in layer.named_modules():
                if name:
                    handles.append(module.register_forward_hook(hook_for(raw[i], name), with_kwargs=True))
        for name, module in parent.named_children():
            if name != list_attr:
                handles.append(module.register_forward_hook(hook_for(siblings, name), with_kwargs=True))
        run(model, ids)
    finally:
        for h in handles:
            h.remove()
    if len(bounds) != n or any(b[1] is None for b in bounds.values()):
        raise RefusalEditError("not every decoder layer ran in the forward pass")
    shape = tuple(bounds[0][0].shape)
    for store in [*raw.values(), siblings]:
        for call in store.values():
            call.inp = rows(call.inp, shape)
            call.out = rows(_first(call.raw_out), shape)
    return Recording(
        shape,
        [rows(bounds[i][0], shape) for i in range(n)],
        [rows(bounds[i][1], shape) for i in range(n)],
        [bounds[i][2] for i in range(n)],
        [raw[i] for i in range(n)],
        siblings,
    )
