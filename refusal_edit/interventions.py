"""Run-time interventions with hooks: directional ablation and activation addition.

`ablation` is the in-memory twin of the weight edit: it projects the direction off the output of every
module that writes into the residual stream (embeddings, attention, MLP / MoE block). On sandwich-norm
architectures the projection happens before the post-projection norm, against `normalize(g * r)`, which
is exactly what orthogonalizing the projection weights does. The exactness tests compare edited
checkpoints against these hooks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from refusal_edit.anatomy import Anatomy, anatomy
from refusal_edit.errors import RefusalEditError


def unit(vector: torch.Tensor) -> torch.Tensor:
    """`vector / |vector|` in float32; a clear error for zero or non-finite vectors."""
    v = vector.detach().float()
    if not torch.isfinite(v).all():
        raise RefusalEditError("direction contains NaN or infinite values")
    norm = v.norm()
    if norm == 0:
        raise RefusalEditError("direction is the zero vector")
    return v / norm


def writer_directions(anat: Anatomy, r: torch.Tensor) -> dict[tuple[int, str], torch.Tensor | None]:
    """The unit vector to remove from each layer writer: r, or normalize(g * r) before a sandwich norm.

    `None` means the norm gain kills every r component already (g * r == 0): nothing to remove.
    """
    out: dict[tuple[int, str], torch.Tensor | None] = {}
    for layer in range(anat.num_layers):
        for site in ("attn", "mlp"):
            gain = anat.post_norm_gain(layer, site)
            if gain is None:
                out[layer, site] = r
            else:
                scaled = gain.to(r.device) * r
                n = scaled.norm()
                out[layer, site] = None if n == 0 else scaled / n
    return out


def _project(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    uu = u.to(device=x.device)
    coef = x.float() @ uu
    return (x.float() - coef.unsqueeze(-1) * uu).to(x.dtype)


def _projection_hook(u: torch.Tensor):
    def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (_project(output[0], u), *output[1:])
        if hasattr(output, "last_hidden_state"):  # never expected for writers, but be explicit
            raise RefusalEditError("unexpected model output type at a residual writer")
        return _project(output, u)

    return hook


@contextmanager
def ablation(model: nn.Module, direction: torch.Tensor) -> Iterator[None]:
    """Project `direction` off every residual writer's output while the context is active."""
    anat = anatomy(model)
    r = unit(direction)
    if r.numel() != anat.hidden_size:
        raise RefusalEditError(f"direction has size {r.numel()}, the model's hidden size is {anat.hidden_size}")
    handles = [emb.register_forward_hook(_projection_hook(r)) for emb in anat.embeddings]
    for (layer, site), u in writer_directions(anat, r).items():
        if u is None:
            continue
        module = anat.attn(layer) if site == "attn" else anat.mlp(layer)
        handles.append(module.register_forward_hook(_projection_hook(u)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


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


@dataclass(frozen=True)
class Intervention:
    """A hook-based edit described by data, so it can be recorded in reports and applied anywhere."""

    kind: Literal["ablate", "add"]
    direction: torch.Tensor  # unit direction for ablate, the raw vector for add
    layer: int | None = None
    coeff: float = 1.0
    site: str = "input"

    @contextmanager
    def apply(self, model: nn.Module) -> Iterator[None]:
        with ExitStack() as stack:
            if self.kind == "ablate":
                stack.enter_context(ablation(model, self.direction))
            else:
                if self.layer is None:
                    raise RefusalEditError("an addition needs a layer")
                stack.enter_context(addition(model, self.direction, self.layer, self.coeff, self.site))
            yield

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "layer": self.layer, "coeff": self.coeff, "site": self.site}
