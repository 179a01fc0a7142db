"""Direction-aware rounding: requantized edits that keep the direction removed.

An edit moves each weight by a small amount (r_i (r . w) for an ablation), usually less than half a
quantization step. Requantizing with ordinary nearest rounding therefore snaps most weights back to the
values they had: measured on a random [896, 1024] matrix stored as Q4_K, 65% of the removed component comes
back (Q5_0 37%, Q6_K 7%, Q8_0 0.8%), far above the requantization noise itself.

So the requantized tensor keeps the scales ggml's algorithm chose and only re-decides roundings: every
stored value is `a * L + c` (step `a` and offset `c` per sub-block, integer level `L`), and the constraint
is that the tensor's component along each basis vector equals the float edit's (zero for a full ablation).
For each constraint group (a column of a Linear [H, in] along H, a row of an embedding along H) the
residual is cancelled by moving levels one step, cheapest first: cost = the squared-error increase,
gain = the residual reduction. Only values near a rounding boundary move, so the error barely grows.
Linear tensors processed in chunks of rows carry their residual into the next chunk.

`Codec`s read and write the levels of each block type without touching its scales.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import Q4_K as _GQ4K

Q = GGMLQuantizationType
F32 = np.float32


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    return blocks[:, at : at + 2].copy().view(np.float16).astype(F32)  # [nb, 1]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """ggml's 4-bit layout of a 32-value block: value j < 16 in the low nibble of byte j, j >= 16 high."""
    return np.concatenate([qs & 15, qs >> 4], axis=1)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    half = q.shape[1] // 2
    return (q[:, :half] & 15) | (q[:, half:] << 4)


def _bits32(qh: np.ndarray) -> np.ndarray:
    return np.unpackbits(qh, axis=1, bitorder="little")  # [nb, 32]


def _k_sub(values: np.ndarray, size: int) -> np.ndarray:
    """Per-sub-block values [nb, n_sub] repeated for each of its `size` elements."""
    return np.repeat(values.astype(F32), size, axis=1)


def _kq_levels(qs: np.ndarray, chunks: int, bits: int) -> np.ndarray:
    """K-quant low bits: in each chunk of 32 bytes, value (part p, l) sits at bit `bits * p` of byte l."""
    nb = qs.shape[0]
    parts = 8 // bits
    mask = (1 << bits) - 1
    b = qs.reshape(nb, chunks, 1, 32) >> (bits * np.arange(parts, dtype=np.uint8)).reshape(1, 1, parts, 1)
    return (b & mask).reshape(nb, chunks * parts * 32)


def _kq_pack(levels: np.ndarray, chunks: int, bits: int) -> np.ndarray:
    nb = levels.shape[0]
    parts = 8 // bits
    lv = levels.astype(np.uint8).reshape(nb, chunks, parts, 32)
    shifts = (bits * np.arange(parts, dtype=np.uint8)).reshape(1, 1, parts, 1)
    return (lv << shifts).sum(axis=2, dtype=np.uint8).reshape(nb, chunks * 32)


class Codec:
    """Levels of one block type: `unpack` -> (step a, offset c, level L) per value; `pack` writes new levels."""

    lo = 0
    hi = 0

    def unpack(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray | np.float32, np.ndarray]:
        raise NotImplementedError

    def pack(self, blocks: np.ndarray, levels: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class _Q8_0(Codec):
    lo, hi = -128, 127

    def unpack(self, b):
        return _f16(b, 0), F32(0), b[:, 2:].view(np.int8).astype(np.int16)

    def pack(self, b, lv):
        out = b.copy()
        out[:, 2:] = lv.astype(np.int8).view(np.uint8)
        return out


class _Legacy(Codec):
    """Q4_0 / Q4_1 / Q5_0 / Q5_1: d (and m), optional high bits qh (u32), nibbles qs."""

    def __init__(self, has_min: bool, high: bool) -> None:
        self.has_min, self.high = has_min, high
        top = 31 if high else 15
        self.offset = 0 if has_min else (top + 1) // 2  # symmetric types store level + offset
        self.lo, self.hi = -self.offset, top - self.offset
        self.qh_at = 4 if has_min else 2
        self.qs_at = self.qh_at + (4 if high else 0)

    def unpack(self, b):
        q = _nibbles(b[:, self.qs_at :]).astype(np.int16)
        if self.high:
            q |= _bits32(b[:, self.qh_at : self.qs_at]).astype(np.int16) << 4
        c = _f16(b, 2) if self.has_min else F32(0)
        return _f16(b, 0), c, q - self.offset

    def pack(self, b, lv):
        q = (lv + self.offset).astype(np.uint8)
        out = b.copy()
        out[:, self.qs_at :] = _pack_nibbles(q)
        if self.high:
            out[:, self.qh_at : self.qs_at] = np.packbits(q >> 4, axis=1, bitorder="little")
        return out


class _Q4K(Codec):
    """Q4_K / Q5_K: d, dmin, 12 bytes of 6-bit scales and mins, (Q5_K: qh[32]), qs[128]."""

    def __init__(self, five: bool) -> None:
        self.five = five
        self.lo, self.hi = 0, 31 if five else 15

    def unpack(self, b):
        sc, m = _GQ4K.get_scale_min(b[:, 4:16])
        a = _f16(b, 0) * _k_sub(sc, 32)
        c = -(_f16(b, 2) * _k_sub(m, 32))
        qs_at = 48 if self.five else 16
        lv = _kq_levels(b[:, qs_at:], 4, 4).astype(np.int16)
        if self.five:
            lv |= _kq_levels(b[:, 16:48], 1, 1).astype(np.int16) << 4
        return a, c, lv

    def pack(self, b, lv):
        out = b.copy()
        if self.five:
            out[:, 48:] = _kq_pack(lv & 15, 4, 4)
            out[:, 16:48] = _kq_pack(lv >> 4, 1, 1)
        else:
            out[:, 16:] = _kq_pack(lv, 4, 4)
        return out


class _Q6K(Codec):
    """Q6_K: ql[128] (4 low bits), qh[64] (2 high bits), int8 scales[16], d."""

    lo, hi = -32, 31

    def unpack(self, b):
        nb = b.shape[0]
        ql = b[:, :128].reshape(nb, 2, 2, 32)  # [half, byte group of 32, l]
        low = np.stack([ql[:, :, 0] & 15, ql[:, :, 1] & 15, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], axis=2)
        high = _kq_levels(b[:, 128:192], 2, 2).reshape(nb, 2, 4, 32)
        lv = (low | (high << 4)).reshape(nb, 256).astype(np.int16) - 32
        a = _f16(b, 208) * _k_sub(b[:, 192:208].view(np.int8), 16)
        return a, F32(0), lv

    def pack(self, b, lv):
        nb = b.shape[0]
        q = (lv + 32).astype(np.uint8).reshape(nb, 2, 4, 32)
        low = q & 15
        out = b.copy()
        out[:, :128] = np.stack(
            [low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2
        ).reshape(nb, 128)
        out[:, 128:192] = _kq_pack((q >> 4).reshape(nb, 256), 2, 2)
        return out


class _Q2K(Codec):
    """Q2_K: scales[16] (4-bit scale, 4-bit min), qs[64], d, dmin."""

    lo, hi = 0, 3

    def unpack(self, b):
        a = _f16(b, 80) * _k_sub(b[:, :16] & 15, 16)
        c = -(_f16(b, 82) * _k_sub(b[:, :16] >> 4, 16))
        return a, c, _kq_levels(b[:, 16:80], 2, 2).astype(np.int16)

    def pack(self, b, lv):
        out = b.copy()
        out[:, 16:80] = _kq_pack(lv, 2, 2)
        return out


class _Q3K(Codec):
    """Q3_K: hmask[32] (high bit set = +0, clear = -4), qs[64], 12 bytes of 6-bit scales, d."""

    lo, hi = -4, 3

    def unpack(self, b):
        nb = b.shape[0]
        sc = b[:, 96:108]
        low = np.concatenate([sc[:, :8] & 15, sc[:, :8] >> 4], axis=1)
        high = (sc[:, 8:12].reshape(nb, 1, 4) >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 4, 1)) & 3
        scales = (low | (high.reshape(nb, 16) << 4)).astype(np.int16) - 32
        a = _f16(b, 108) * _k_sub(scales, 16)
        hbit = _kq_levels(b[:, :32], 1, 1)
        lv = _kq_levels(b[:, 32:96], 2, 2).astype(np.int16) - 4 * (1 - hbit.astype(np.int16))
        return a, F32(0), lv

    def pack(self, b, lv):
        out = b.copy()
        hbit = (lv >= 0).astype(np.uint8)
        out[:, :32] = _kq_pack(hbit, 1, 1)
        out[:, 32:96] = _kq_pack((lv + 4 * (1 - hbit)).astype(np.uint8), 2, 2)
        return out


CODECS: dict[GGMLQuantizationType, Codec] = {
    Q.Q8_0: _Q8_0(),
    Q.Q4_0: _Legacy(has_min=False, high=False),
    Q.Q4_1: _Legacy(has_min=True, high=False),
    Q.Q5_0: _Legacy(has_min=False, high=True),
    Q.Q5_1: _Legacy(has_min=True, high=True),
    Q.Q2_K: _Q2K(),
    Q.Q3_K: _Q3K(),
    Q.Q4_K: _Q4K(five=False),
    Q.Q5_K: _Q4K(five=True),
    Q.Q6_K: _Q6K(),
}


def _blocks(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    return np.ascontiguousarray(data).view(np.uint8).reshape(-1, GGML_QUANT_SIZES[qtype][1])


def grid(data: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """(step a, offset c, level L) of every stored value, each in `shape`: value = a * L + c."""
    a, c, lv = CODECS[qtype].unpack(_blocks(data, qtype))
    return tuple(np.ascontiguousarray(np.broadcast_to(x, lv.shape)).reshape(shape) for x in (a, c, lv))


def with_levels(data: np.ndarray, qtype: GGMLQuantizationType, levels: np.ndarray) -> np.ndarray:
    block = GGML_QUANT_SIZES[qtype][0]
    packed = CODECS[qtype].pack(_blocks(data, qtype), levels.reshape(-1, block))
    return packed.reshape(np.shape(data))


GROUP_SLICE = 1 << 20  # values per slice of groups solved at once (bounds the solver's memory)
CANDIDATES = 128  # cheapest moves ranked per group (a few % of the members move); all of them when too few


def balance(
    target: np.ndarray,
    a: np.ndarray,
    c: np.ndarray,
    levels: np.ndarray,
    weights: np.ndarray,
    lo: int,
    hi: int,
    carry: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Move levels one step to cancel, per group (column), sum_members weight * (value - target) + carry.

    Arrays are [members, groups], `weights` [members]. Returns the new levels and the residual left per group.
    """
    members, groups = target.shape
    out = np.empty_like(levels)
    left = np.empty(groups)
    step = max(1, GROUP_SLICE // max(members, 1))
    w = np.asarray(weights, dtype=F32)[None, :]
    for g in range(0, groups, step):
        sl = slice(g, g + step)
        # Solve with members contiguous (rows of [groups, members]): sorting along rows is twice as fast.
        rows = [np.ascontiguousarray(x[:, sl].T) for x in (target, a, c, levels)]
        lv, left[sl] = _balance(*rows, w, lo, hi, None if carry is None else carry[sl])
        out[:, sl] = lv.T
    return out, left


def _balance(target, a, c, levels, w, lo, hi, carry):
    """[groups, members] arrays: the cheapest level moves (squared-error increase per unit of residual
    removed) whose summed effect brings each group's residual closest to zero."""
    a = a.astype(F32, copy=False)
    dev = a * levels + c - target
    residual = (dev * w).sum(axis=1, dtype=np.float64) + (0.0 if carry is None else carry)
    effect = a * w  # change of the residual per level step up
    step = (-np.sign(residual).astype(F32)[:, None] * np.sign(effect)).astype(np.int16)
    new = levels + step
    ok = (step != 0) & (new >= lo) & (new <= hi)
    gain = np.abs(effect) * ok
    cost = a * a + 2 * step * a * dev  # increase of the squared error
    with np.errstate(divide="ignore", invalid="ignore"):
        eff = np.where(gain > 0, cost / gain, np.inf).astype(F32)
    need = np.abs(residual)
    limit = _limits(eff, gain, need, CANDIDATES)
    short = ~np.isfinite(limit) & (limit > 0)  # the cheapest candidates could not cancel the residual: all of them
    if short.any():
        limit[short] = _limits(eff[short], gain[short], need[short], eff.shape[1])
    move = ok & (eff <= limit[:, None])
    out = np.where(move, new, levels)
    left = residual - (np.where(move, step * effect, 0)).sum(axis=1, dtype=np.float64)
    return out, left


def _limits(eff: np.ndarray, gain: np.ndarray, need: np.ndarray, k: int) -> np.ndarray:
    """Per group, the efficiency of the last move taken when moves are taken cheapest first until the summed
    gain is closest to `need` (-inf: no move; +inf: even the `k` cheapest fall short)."""
    m = eff.shape[1]
    if k < m:
        idx = np.argpartition(eff, k - 1, axis=1)[:, :k]
        idx = np.take_along_axis(idx, np.argsort(np.take_along_axis(eff, idx, axis=1), axis=1), axis=1)
    else:
        idx = np.argsort(eff, axis=1)
    cum = np.cumsum(np.take_along_axis(gain, idx, axis=1), axis=1, dtype=np.float64)
    n = cum.shape[1]
    below = (cum < need[:, None]).sum(axis=1)  # moves that stay short of the residual
    over = np.take_along_axis(cum, np.minimum(below, n - 1)[:, None], axis=1)[:, 0]
    under = np.where(below > 0, np.take_along_axis(cum, np.maximum(below - 1, 0)[:, None], axis=1)[:, 0], 0.0)
    take = np.where((below < n) & (over - need < need - under), below + 1, below)
    last = np.take_along_axis(eff, np.take_along_axis(idx, np.maximum(take - 1, 0)[:, None], axis=1), axis=1)[:, 0]
    limit = np.where(take > 0, last, -np.inf).astype(np.float64)
    return np.where((take == n) & (n < m) & (cum[:, -1] < need), np.inf, limit)


class DirectionRounding:
    """Re-rounds each requantized chunk of one projected tensor so its component along the basis matches the
    float edit's (see module docstring). Layouts follow the chunk transforms of `refusal_edit.edits.ops`."""

    def __init__(self, transform: object, qtype: GGMLQuantizationType) -> None:
        from refusal_edit.edits.ops import ProjectExperts, ProjectFirstDim

        self.q = np.asarray(transform.q, dtype=np.float64)  # type: ignore[attr-defined]
        self.codec = CODECS[qtype]
        self.qtype = qtype
        self.kind = "columns" if isinstance(transform, ProjectFirstDim) else "experts"
        if not isinstance(transform, ProjectFirstDim | ProjectExperts):
            self.kind = "rows"
        self.carry: list[np.ndarray | None] = [None] * self.q.shape[0]

    def _members(self, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Stored-layout values -> [members along the residual axis, groups]."""
        if self.kind == "columns":
            return x.reshape(shape[0], -1)
        if self.kind == "experts":
            return x.reshape(shape).transpose(1, 0, 2).reshape(shape[1], -1)
        return x.reshape(-1, shape[-1]).T

    def _back(self, m: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if self.kind == "columns":
            return m.reshape(shape)
        if self.kind == "experts":
            return m.reshape(shape[1], shape[0], shape[2]).transpose(1, 0, 2).reshape(shape)
        return np.ascontiguousarray(m.T).reshape(shape)

    def __call__(
        self, start: int, stop: int, target: np.ndarray, data: np.ndarray, shape: tuple[int, ...]
    ) -> np.ndarray:
        """New bytes for the chunk `target` (float edit, HF chunk `shape`) quantized as `data`."""
        if len(shape) < 2:
            return data
        a, c, lv = (self._members(x, shape) for x in grid(data, self.qtype, target.shape))
        t = self._members(target, shape)
        rounds = 1 if self.q.shape[0] == 1 else 2  # a subspace: later vectors' moves disturb earlier ones
        carry_in = list(self.carry)
        for _ in range(rounds):
            for k, basis in enumerate(self.q):
                w = basis[start:stop] if self.kind == "columns" else basis
                lv, left = balance(t, a, c, lv, w, self.codec.lo, self.codec.hi, carry_in[k])
                if self.kind == "columns":  # the next chunk of rows cancels what this one could not
                    self.carry[k] = left
        return with_levels(data, self.qtype, self._back(lv, shape))
