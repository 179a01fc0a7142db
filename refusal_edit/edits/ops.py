"""Tensor edits, applied chunk by chunk along dim 0 in float32.

Which axis holds the residual stream differs by layout, hence one class per layout:
- `ProjectLastDim`: every row is a residual vector (embedding [V, H], GPT-2 Conv1D [in, H],
  fused experts stored [E, I, H]): x - (x . u) u per row.
- `ProjectFirstDim`: dim 0 is the residual axis (Linear [H, in], bias [H]): W - u (u^T W). u^T W sums over
  all rows, so these need one observing pass over the chunks before the writing pass.
- `ProjectExperts`: fused experts [E, H, I], each expert a Linear: chunks hold whole experts.
- `AddLastDim` / `AddFirstDim`: add a residual vector to every row (embedding) or to a bias.
Future variants (norm-preserving, projected) are further classes with the same two methods.
Chunks are private float32 buffers, so updates are done in place (fused rank-1 updates: no temporaries).
"""

from __future__ import annotations

import torch


class ChunkTransform:
    """Edits rows [start, stop) of a float32 tensor; `needs_pass` ones first `observe` every chunk."""

    needs_pass = False
    label = "edit"

    def observe(self, start: int, stop: int, chunk: torch.Tensor) -> None:  # pragma: no cover - default
        pass

    def apply(self, start: int, stop: int, chunk: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ProjectLastDim(ChunkTransform):
    label = "orthogonalize rows"

    def __init__(self, u: torch.Tensor) -> None:
        self.u = u.float()

    def apply(self, start: int, stop: int, chunk: torch.Tensor) -> torch.Tensor:
        rows = chunk.reshape(-1, chunk.shape[-1])
        rows.addr_(rows @ self.u, self.u, alpha=-1)
        return chunk


class ProjectFirstDim(ChunkTransform):
    needs_pass = True
    label = "orthogonalize columns"

    def __init__(self, u: torch.Tensor) -> None:
        self.u = u.float()
        self.acc: torch.Tensor | None = None  # float64 u^T W

    def observe(self, start: int, stop: int, chunk: torch.Tensor) -> None:
        # float32 products within a chunk, float64 across chunks: exact enough, and no float64 copy.
        part = torch.tensordot(self.u[start:stop], chunk, dims=1).double()
        self.acc = part if self.acc is None else self.acc + part

    def apply(self, start: int, stop: int, chunk: torch.Tensor) -> torch.Tensor:
        assert self.acc is not None, "observe() must see every chunk first"
        u, acc = self.u[start:stop], self.acc.float()
        if chunk.dim() == 1:  # a bias: acc is the scalar u . b
            return chunk.sub_(u * acc)
        chunk.reshape(chunk.shape[0], -1).addr_(u, acc.reshape(-1), alpha=-1)
        return chunk


class ProjectExperts(ChunkTransform):
    label = "orthogonalize experts"

    def __init__(self, u: torch.Tensor) -> None:
        self.u = u.float()

    def apply(self, start: int, stop: int, chunk: torch.Tensor) -> torch.Tensor:
        a = torch.einsum("h,ehi->ei", self.u, chunk)
        return chunk.baddbmm_(self.u.reshape(1, -1, 1).expand(chunk.shape[0], -1, 1), a.unsqueeze(1), alpha=-1)


class AddLastDim(ChunkTransform):
    label = "add to rows"

    def __init__(self, v: torch.Tensor) -> None:
        self.v = v.float()

    def apply(self, start: int, stop: int, chunk: torch.Tensor) -> torch.Tensor:
        return chunk.add_(self.v)


class AddFirstDim(ChunkTransform):
    label = "add to bias"

    def __init__(self, v: torch.Tensor) -> None:
        self.v = v.float()

    def apply(self, start: int, stop: int, chunk: torch.Tensor) -> torch.Tensor:
        return chunk.add_(self.v[start:stop])
