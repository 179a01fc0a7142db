"""Tensor edits, applied chunk by chunk along dim 0 in float32.

Every projection removes `alpha` times the component along an orthonormal basis Q [k, H] of the residual
stream (k = 1 and alpha = 1 is the paper's orthogonalization; alpha < 1 a partial one; k > 1 a subspace).
With `preserve_norm`, each vector that one input unit writes into the residual stream (a column of a
Linear's [H, in] weight, a row of an embedding) is rescaled to its original norm after the projection.

Which axis holds the residual stream differs by layout, hence one class per layout:
- `ProjectLastDim`: every row is a residual vector (embedding [V, H], GPT-2 Conv1D [in, H],
  fused experts stored [E, I, H]): x - alpha Q^T (Q x) per row.
- `ProjectFirstDim`: dim 0 is the residual axis (Linear [H, in], bias [H]): W - alpha Q^T (Q W). Q W sums over
  all rows (and so do column norms), so these need one observing pass over the chunks before the writing pass.
- `ProjectExperts`: fused experts [E, H, I], each expert a Linear: chunks hold whole experts.
- `AddLastDim` / `AddFirstDim`: add a residual vector to every row (embedding) or to a bias.
Chunks are private float32 buffers, so updates are done in place (fused updates: no large temporaries).
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


class _Projection(ChunkTransform):
    def __init__(self, basis: torch.Tensor, alpha: float = 1.0, preserve_norm: bool = False) -> None:
        q = basis.float()
        self.q = q.reshape(1, -1) if q.dim() == 1 else q  # [k, H], orthonormal rows
        self.alpha = float(alpha)
        self.preserve_norm = preserve_norm

    @property
    def u(self) -> torch.Tensor:
        """The first basis vector (the direction itself for rank-1 edits)."""
        return self.q[0]


def _rescale(x: torch.Tensor, before: torch.Tensor, dim: int) -> None:
    """Scale slices of `x` (in place) so their norms along `dim` return to `before`; zero slices stay zero."""
    after = torch.linalg.vector_norm(x, dim=dim, keepdim=True)
    x.mul_(torch.where(after > 0, before / after.clamp_min(torch.finfo(x.dtype).tiny), torch.ones_like(after)))


class ProjectLastDim(_Projection):
    label = "orthogonalize rows"

    def apply(self, start: int, stop: int, chunk: torch.Tensor) -> torch.Tensor:
        rows = chunk.reshape(-1, chunk.shape[-1])
        before = torch.linalg.vector_norm(rows, dim=1, keepdim=True) if self.preserve_norm else None
        rows.addmm_(rows @ self.q.T, self.q, alpha=-self.alpha)
        if before is not None:
            _rescale(rows, before, dim=1)
        return chunk


class ProjectFirstDim(_Projection):
    needs_pass = True
    label = "orthogonalize columns"

    def __init__(self, basis: torch.Tensor, alpha: float = 1.0, preserve_norm: bool = False) -> None:
        super().__init__(basis, alpha, preserve_norm)
        self.acc: torch.Tensor | None = None  # float64 Q W [k, in] (a bias: [k])
        self.sq: torch.Tensor | None = None  # float64 squared column norms [in] (a bias: scalar)

    def observe(self, start: int, stop: int, chunk: torch.Tensor) -> None:
        # float32 products within a chunk, float64 across chunks: exact enough, and no float64 copy.
        part = torch.tensordot(self.q[:, start:stop], chunk, dims=1).double()
        self.acc = part if self.acc is None else self.acc + part
        if self.preserve_norm:
            sq = chunk.square().sum(0).double()
            self.sq = sq if self.sq is None else self.sq + sq

    def _scale(self) -> torch.Tensor:
        """Old norm / new norm of every column: |w - a Q^T Q w|^2 = |w|^2 - (2a - a^2) |Q w|^2 for orthonormal Q."""
        assert self.acc is not None and self.sq is not None
        a = self.alpha
        new = (self.sq - (2 * a - a * a) * self.acc.square().sum(0)).clamp_min(0)
        return torch.where(new > 0, (self.sq / new.clamp_min(1e-300)).sqrt(), torch.ones_like(new)).float()

    def apply(self, start: int, stop: int, chunk: torch.Tensor) -> torch.Tensor:
        assert self.acc is not None, "observe() must see every chunk first"
        q, acc = self.q[:, start:stop], self.acc.float()
        if chunk.dim() == 1:  # a bias: acc is Q b
            chunk.sub_(self.alpha * (q.T @ acc))
        else:
            chunk.reshape(chunk.shape[0], -1).addmm_(q.T, acc.reshape(acc.shape[0], -1), alpha=-self.alpha)
        if self.preserve_norm:
            chunk.mul_(self._scale().reshape(chunk.shape[1:]) if chunk.dim() > 1 else self._scale())
        return chunk


class ProjectExperts(_Projection):
    label = "orthogonalize experts"

    def apply(self, start: int, stop: int, chunk: torch.Tensor) -> torch.Tensor:
        before = torch.linalg.vector_norm(chunk, dim=1, keepdim=True) if self.preserve_norm else None
        a = torch.einsum("kh,ehi->eki", self.q, chunk)
        chunk.baddbmm_(self.q.T.unsqueeze(0).expand(chunk.shape[0], -1, -1), a, alpha=-self.alpha)
        if before is not None:
            _rescale(chunk, before, dim=1)
        return chunk


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


def apply_whole(transform: ChunkTransform, tensor: torch.Tensor) -> torch.Tensor:
    """Run a transform over a whole float32 tensor held in memory (one chunk), in place."""
    stop = tensor.shape[0] if tensor.dim() else 0
    if transform.needs_pass:
        transform.observe(0, stop, tensor)
    return transform.apply(0, stop, tensor)
