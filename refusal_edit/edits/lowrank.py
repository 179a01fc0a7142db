"""The low-rank form of an edit plan: what an adapter (PEFT, llama.cpp LoRA) carries instead of new weights.

A projection `W' = W - alpha Q^T (Q W)` (Q [k, H] orthonormal) changes its tensor by a rank-k product, so the
change is two small factors: `B = -alpha Q^T` [H, k] and `A = Q W` [k, n]. The factors are derived from the
plan's own `ChunkTransform`s (basis, weight, sandwich-norm rule and all), so an adapter and a checkpoint come
from one planner and cannot drift apart. Every delta is given in *residual-first* orientation:

- `linear` (a Linear [H, in]): delta = B @ A;
- `rows` (every row a residual vector: an embedding [V, H], GPT-2's Conv1D [in, H]): delta = (B @ A)^T;
- `experts` (fused [E, H, I]): delta_e = B @ A_e, A [E, k, I];
- `bias` ([H], or per-expert [E, H]): a constant shift `shift`, no factors (a LoRA product cannot add a
  constant; only an adapter format with a bias term carries it).

Norm-preserving projections rescale every column after the projection (not low-rank) and additions are
constant shifts of a whole tensor: both are refused with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from refusal_edit.edits.ops import (
    AddFirstDim,
    AddLastDim,
    ChunkTransform,
    ProjectExperts,
    ProjectFirstDim,
    ProjectLastDim,
)
from refusal_edit.edits.plan import EditPlan
from refusal_edit.errors import RefusalEditError

Chunks = Iterable[tuple[int, int, torch.Tensor]]  # (start, stop, float32 rows [start, stop) along HF dim 0)


@dataclass
class Factors:
    """The change of one planned tensor (see module docstring)."""

    name: str
    layout: str  # linear | rows | experts | bias
    b: torch.Tensor | None  # [H, k]
    a: torch.Tensor | None  # [k, n] (experts: [E, k, I])
    shift: torch.Tensor | None = None  # bias: the added vector(s), [H] or [E, H]

    @property
    def rank(self) -> int:
        return 0 if self.b is None else int(self.b.shape[1])

    def delta(self) -> torch.Tensor:
        """The dense change of the tensor in its own orientation (for checks; adapters keep the factors)."""
        if self.layout == "bias":
            assert self.shift is not None
            return self.shift
        assert self.a is not None and self.b is not None
        if self.layout == "experts":
            return torch.einsum("hk,eki->ehi", self.b, self.a)
        product = self.b @ self.a
        return product.T if self.layout == "rows" else product

    def padded(self, rank: int) -> Factors:
        """The same change with zero factors up to `rank` (formats whose scale is alpha / rank want one rank)."""
        if self.b is None or self.a is None or rank == self.rank:
            return self
        extra = rank - self.rank
        b = torch.cat([self.b, self.b.new_zeros(self.b.shape[0], extra)], dim=1)
        pad = (*self.a.shape[:-2], extra, self.a.shape[-1])
        a = torch.cat([self.a, self.a.new_zeros(pad)], dim=-2)
        return Factors(self.name, self.layout, b, a, self.shift)


def check_low_rank(plan: EditPlan, what: str) -> None:
    """A clear error naming why `plan` cannot be carried by a low-rank adapter (`what`: its format's name)."""
    if plan.mode != "ablate":
        raise RefusalEditError(
            f"a {what} carries directional ablation (a low-rank change of each writer); an addition is a constant "
            "shift: bake it into a checkpoint or GGUF, or use `export-cvec` (llama.cpp control vector)"
        )
    for name, t in plan.transforms.items():
        if isinstance(t, AddFirstDim | AddLastDim):
            raise RefusalEditError(f"a {what} cannot carry the addition to {name}")
        if getattr(t, "preserve_norm", False):
            raise RefusalEditError(
                f"a {what} cannot carry a norm-preserving edit: rescaling every written vector to its old norm "
                "is not a low-rank change; write a checkpoint (or drop `preserve_norm`)"
            )


def factors(name: str, transform: ChunkTransform, chunks: Chunks, bias: bool = False) -> Factors:
    """The factors of `transform` applied to the tensor whose float32 row chunks are `chunks`.

    `bias`: the tensor is a bias (1-D, or per-expert biases [E, H] stored residual-last): its change is a
    constant `shift`. The chunks are only read; the tensor itself is never edited.
    """
    if not isinstance(transform, ProjectFirstDim | ProjectLastDim | ProjectExperts):
        raise RefusalEditError(f"{name}: {transform.label} is not a low-rank change")
    if transform.preserve_norm:
        raise RefusalEditError(f"{name}: a norm-preserving edit is not a low-rank change")
    q, alpha = transform.q, transform.alpha
    b = -alpha * q.T.contiguous()  # [H, k]
    parts: list[torch.Tensor] = []
    acc: torch.Tensor | None = None
    for start, stop, chunk in chunks:
        if isinstance(transform, ProjectFirstDim):  # Q W summed over the residual rows, in float64 across chunks
            part = torch.tensordot(q[:, start:stop], chunk, dims=1).double()
            acc = part if acc is None else acc + part
        elif isinstance(transform, ProjectExperts):
            parts.append(torch.einsum("kh,ehi->eki", q, chunk))
        else:
            parts.append(chunk.reshape(-1, q.shape[1]) @ q.T)  # [rows, k]
    if isinstance(transform, ProjectFirstDim):
        assert acc is not None
        if acc.dim() == 1:  # a bias [H]: Q b [k]
            return Factors(name, "bias", None, None, shift=(b.double() @ acc).float())
        return Factors(name, "linear", b, acc.reshape(acc.shape[0], -1).float())
    if isinstance(transform, ProjectExperts):
        return Factors(name, "experts", b, torch.cat(parts))
    rows = torch.cat(parts)  # [n, k]
    if bias:  # per-expert biases [E, H]: each row shifts by -alpha Q^T (Q b_e)
        return Factors(name, "bias", None, None, shift=(rows @ b.T))
    return Factors(name, "rows", b, rows.T.contiguous())


def plan_factors(
    plan: EditPlan, chunks_of: Callable[[str], Chunks], is_bias: Callable[[str], bool], what: str
) -> list[Factors]:
    """The factors of every tensor `plan` transforms, in the plan's order. `chunks_of(name)` streams a tensor's
    float32 rows; `is_bias(name)` says whether it is a bias."""
    check_low_rank(plan, what)
    return [factors(name, t, chunks_of(name), is_bias(name)) for name, t in plan.transforms.items()]
