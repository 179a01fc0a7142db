"""What a decoder layer adds into the residual stream, found numerically on a recorded forward pass.

A layer's delta (output - input) must lie, token by token, in the span of a *smallest* set of its modules'
outputs (plus the input itself: a layer may rescale the stream, Gemma 4's `layer_scalar`). Nothing missing
(the span holds) and nothing extra (no smaller set does). A term that is a norm (its output is its input
times a per-token scalar times its gain, `w` or `1 + w` as measured) is followed to its own input, which is
decomposed the same way: sandwich norms, and Gemma 4's two MoE branches each through a norm into a shared one.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from refusal_edit.derive.probe import Call
from refusal_edit.errors import RefusalEditError

SPAN_TOL = 1e-4  # relative residual of a token's delta outside the span (fp32 noise is ~1e-7)
MAX_TERMS = 4


@dataclass(frozen=True)
class Term:
    """A writer module and the norms between its output and the residual add (innermost first)."""

    module: str
    chain: tuple[str, ...]
    top: str  # the outermost module of the term (a norm, or the writer itself): what the layer adds


def span_residual(target: torch.Tensor, terms: list[torch.Tensor]) -> float:
    """The worst relative distance of a token's `target` row from the span of the terms' rows."""
    if not terms:
        return 1.0
    a = torch.stack(terms, dim=-1)  # [N, H, k]
    sol = torch.linalg.lstsq(a, target.unsqueeze(-1), driver="gelsd").solution
    res = (a @ sol).squeeze(-1) - target
    norm = target.norm(dim=-1)
    floor = 1e-9 * float(norm.max()) + 1e-30
    return float((res.norm(dim=-1) / (norm + floor)).max())


def constant_coefficients(target: torch.Tensor, terms: list[torch.Tensor]) -> list[float] | None:
    """One scalar per term over all tokens, if such scalars reproduce the target (else None: gated)."""
    a = torch.stack([t.reshape(-1) for t in terms], dim=-1)
    sol = torch.linalg.lstsq(a, target.reshape(-1, 1), driver="gelsd").solution
    res = float((a @ sol - target.reshape(-1, 1)).norm() / (target.norm() + 1e-30))
    return [float(x) for x in sol.squeeze(-1)] if res < SPAN_TOL else None


def _depth(name: str) -> int:
    return name.count(".")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-6, atol=1e-9)


def _distinct(calls: dict[str, Call], exclude: list[torch.Tensor]) -> list[Call]:
    """Candidates with an output in the hidden size; of several with the same output, the shallowest."""
    out: list[Call] = []
    for call in sorted(calls.values(), key=lambda c: (_depth(c.name), c.order)):
        if call.out is None or not torch.isfinite(call.out).all() or float(call.out.norm()) == 0:
            continue
        if any(_same(t, call.out) for t in [*exclude, *(c.out for c in out)]):
            continue
        out.append(call)
    return out


def smallest_set(target: torch.Tensor, calls: list[Call], base: list[torch.Tensor]) -> list[Call] | None:
    """The smallest set of calls whose outputs (with `base`) span `target` token by token, shallowest first."""
    for k in range(1, min(MAX_TERMS, len(calls)) + 1):
        for combo in itertools.combinations(calls, k):
            if span_residual(target, [*base, *(c.out for c in combo)]) < SPAN_TOL:
                return list(combo)
    return None


def norm_offset(call: Call) -> float | None:
    """The gain offset c of a norm (its output is (c + w) * input * s(token)), or None if not such a norm.

    A parameterless norm (no weight) is reported as NaN: a per-token scalar only, transparent to the edit.
    """
    x, y = call.inp, call.out
    if x is None or y is None or x.shape != y.shape:
        return None
    params = dict(call.module.named_parameters(recurse=False))
    if not params:
        candidates = {float("nan"): torch.ones(x.shape[-1], dtype=torch.float64)}
    elif set(params) == {"weight"} and params["weight"].shape == (x.shape[-1],):
        w = params["weight"].detach().double()
        candidates = {0.0: w, 1.0: 1.0 + w}
    else:
        return None
    for offset, g in candidates.items():
        gx = g * x
        s = (y * gx).sum(-1, keepdim=True) / gx.square().sum(-1, keepdim=True).clamp_min(1e-300)
        res = (y - s * gx).norm(dim=-1) / (y.norm(dim=-1) + 1e-30)
        if float(res.max()) < SPAN_TOL:
            return offset
    return None


@dataclass
class LayerAccount:
    terms: list[Term]
    offsets: dict[str, float]  # norm name -> gain offset (chains only)
    tops: list[str]  # the top-level terms, in call order


def account_layer(
    layer: int, calls: dict[str, Call], h_in: torch.Tensor, h_out: torch.Tensor, known: list[str] | None = None
) -> LayerAccount:
    """Decompose one layer's delta into writer terms (see module docstring). `known`: the top-level
    modules found on a layer of the same structure; they are checked instead of searched."""
    delta = h_out - h_in
    cands = _distinct(calls, [h_in, h_out])
    if known is not None:
        tops = [calls[name] for name in known if name in calls]
        if len(tops) != len(known) or span_residual(delta, [h_in, *(c.out for c in tops)]) >= SPAN_TOL:
            known = None
    if known is None:
        found = smallest_set(delta, cands, [h_in])
        if found is None:
            raise RefusalEditError(
                f"layer {layer}: no set of at most {MAX_TERMS} modules accounts for what the layer adds to "
                "the residual stream (a norm after the residual add, as in post-LN encoders, or a writer whose "
                "output is not a sum of module outputs)"
            )
        tops = sorted(found, key=lambda c: c.order)
    terms: list[Term] = []
    offsets: dict[str, float] = {}

    def follow(call: Call, chain: tuple[str, ...], top: str, seen: set[str]) -> None:
        offset = norm_offset(call)
        if offset is None:
            terms.append(Term(call.name, chain, top))
            return
        inner = [c for c in cands if c.name != call.name and c.name not in seen and c.order < call.order]
        parts = smallest_set(call.inp, inner, [])
        if parts is None:
            raise RefusalEditError(f"layer {layer}: the input of norm {call.name} is not made of module outputs")
        if offset == offset:  # not NaN: a norm with a gain
            offsets[call.name] = offset
            chain = (call.name, *chain)
        for part in parts:
            follow(part, chain, top, seen | {call.name})

    for call in tops:
        follow(call, (), call.name, set())
    return LayerAccount(terms, offsets, [c.name for c in tops])
