"""Which parameters of a writer module produce its output, and along which axis: found by editing them.

Every (parameter, axis of the hidden size) pair of the module is projected against a random direction r
and the module is run again on its recorded input: the output must lose r. Then each pair is restored in
turn and kept restored if the output still has no r: what remains is a minimal set (the output projection
and its bias; for fused experts, the one axis of [E, H, I] or [E, I, H] that is the residual one, decided
by the numbers, never by names or shapes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from refusal_edit.derive.probe import Call, _first, rows
from refusal_edit.errors import RefusalEditError

FREE_TOL = 1e-5


@dataclass(frozen=True)
class WriterParam:
    name: str  # relative to the writer module
    axis: int
    ndim: int


def project_axis(t: torch.Tensor, r: torch.Tensor, axis: int) -> torch.Tensor:
    """`t` with the component along unit `r` removed on `axis` (the hidden-size axis)."""
    moved = t.movedim(axis, -1)
    rr = r.to(t.dtype)
    return (moved - (moved @ rr).unsqueeze(-1) * rr).movedim(-1, axis)


def _rcomponent(module: nn.Module, call: Call, r: torch.Tensor, shape: tuple[int, ...]) -> float:
    with torch.no_grad():
        out = rows(_first(module(*call.args, **call.kwargs)), shape)
    if out is None:
        raise RefusalEditError(f"module {call.name} gave no output in the hidden size when run again")
    return float(((out @ r.double()).abs() / (out.norm(dim=-1) + 1e-30)).max())


def writer_params(call: Call, hidden: int, shape: tuple[int, ...], seed: int = 7) -> list[WriterParam]:
    """The minimal (parameter, axis) set whose projection removes r from `call.module`'s output."""
    module = call.module
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(hidden, generator=g, dtype=torch.float64)
    r = (r / r.norm()).float()
    params = dict(module.named_parameters())
    pairs = [
        (n, a) for n, p in params.items() for a in range(p.dim()) if p.shape[a] == hidden and p.is_floating_point()
    ]
    saved = {n: p.detach().clone() for n, p in params.items()}
    try:
        with torch.no_grad():
            if _rcomponent(module, call, r, shape) < FREE_TOL:
                raise RefusalEditError(f"module {call.name}'s output already has no component along a random r")

            def apply(chosen: list[tuple[str, int]]) -> float:
                for n, p in params.items():
                    p.copy_(saved[n])
                for n, a in chosen:
                    params[n].copy_(project_axis(params[n].detach(), r, a))
                return _rcomponent(module, call, r, shape)

            if not pairs or apply(pairs) > FREE_TOL:
                raise RefusalEditError(
                    f"editing the weights of {call.name} cannot remove a direction from its output "
                    "(a norm with a bias, or a nonlinearity after its last projection)"
                )
            needed = list(pairs)
            for pair in pairs:
                trial = [p for p in needed if p != pair]
                if trial and apply(trial) <= FREE_TOL:
                    needed = trial
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
    return [WriterParam(n, a, params[n].dim()) for n, a in needed]
