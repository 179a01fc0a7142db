"""The small pieces of linear algebra every edit shares: unit vectors, orthonormal bases, the sandwich rule.

They live once so that the weight edit, its hook twin and the selection proxy cannot drift apart.
"""

from __future__ import annotations

import torch

from refusal_edit.errors import RefusalEditError


def unit(vector: torch.Tensor, what: str = "direction") -> torch.Tensor:
    """`vector / |vector|` in float32; a clear error for zero, non-finite or non-float vectors.

    The norm is taken in float64, so values near the float32 maximum are not mistaken for zero.
    """
    if vector.is_complex() or not vector.is_floating_point():
        raise RefusalEditError(
            f"{what} must hold floating-point values, not {str(vector.dtype).removeprefix('torch.')}"
        )
    v = vector.detach().double()
    if not torch.isfinite(v).all():
        raise RefusalEditError(f"{what} contains NaN or infinite values")
    norm = v.norm()
    if norm == 0:
        raise RefusalEditError(f"{what} is the zero vector")
    return (v / norm).float()


def orthonormal(rows: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """An orthonormal basis [k, H] (float32) of the span of `rows` [n, H], first row first.

    Gram-Schmidt in float64, twice for stability; rows that add less than `tol` (relative) are dropped, so
    the result has k <= n rows and spans what the rows span. The first basis vector is the first row's
    direction, so a rank-k edit led by r still removes r itself exactly.
    """
    rows = rows.detach().double().reshape(-1, rows.shape[-1])
    basis: list[torch.Tensor] = []
    for row in rows:
        norm0 = row.norm()
        if norm0 == 0:
            continue
        v = row.clone()
        for _ in range(2):
            for b in basis:
                v -= (v @ b) * b
        n = v.norm()
        if n > tol * norm0:
            basis.append(v / n)
    if not basis:
        return torch.zeros((0, rows.shape[-1]), dtype=torch.float32)
    return torch.stack(basis).float()


def sandwich(basis: torch.Tensor, gain: torch.Tensor | None) -> torch.Tensor:
    """The basis to remove *before* a norm with gain `g` so that the norm's output has no component along
    `basis`: the orthonormal span of `g * r` for every r in `basis` (rows). With no norm, `basis` itself.

    RMSNorm(x) = g * x / rms(x), so r . RMSNorm(x) = (g * r) . x / rms(x): it vanishes exactly when x is
    orthogonal to g * r. Rows whose `g * r` vanishes need nothing removed (k may shrink, even to 0).
    """
    if gain is None:
        return basis
    return orthonormal(basis * gain.to(basis.device, torch.float32))


def sandwich_rows(rows: torch.Tensor, gain: torch.Tensor | None) -> torch.Tensor:
    """`sandwich` for many single directions at once: normalize(g * r) for each row r [C, H] (a zero row
    where g * r vanishes). For ranking candidates, where each row is its own rank-1 edit."""
    if gain is None:
        return rows
    scaled = rows.float() * gain.to(rows.device, torch.float32)
    norms = scaled.norm(dim=-1, keepdim=True)
    return torch.where(norms > 0, scaled / norms.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(scaled))
