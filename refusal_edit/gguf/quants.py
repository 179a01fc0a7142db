"""Quantize and dequantize GGUF tensor data: gguf-py where it can, our K-quant quantizers where it cannot.

gguf-py 0.19 dequantizes every type but quantizes only F32/F16/BF16, Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0: its
K-quant quantizers raise NotImplementedError. A Q4_K_M file keeps some residual writers in K-quants (the
demo model's `ffn_down` are Q4_K and Q6_K), so an edit that requantizes to the same type needs them.

The K-quant quantizers below implement ggml's reference algorithm (`quantize_row_qN_K_ref` in ggml-quants.c,
what `ggml_quantize_chunk` runs without an importance matrix): per sub-block a weighted least-squares search
for scale (and min), the sub-block scales quantized to 6 or 8 bits against a super-block fp16 scale, then the
values re-quantized against the stored scales. Vectorised across blocks; every float32 operation is done in
the reference's order (sums are sequential, never pairwise), so the bytes match ggml's on the machines we
compared (tests/test_llamacpp_gguf.py).
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gquants

from refusal_edit.errors import RefusalEditError

QK_K = 256
F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)
BATCH_BLOCKS = 1024  # super-blocks per numpy pass: 262k values, the fastest of 256 / 1024 / 4096 here

Q = GGMLQuantizationType
PLAIN = (Q.F32, Q.F16, Q.BF16, Q.F64)


def _rint(f: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """ggml's `nearest_int` (round half to even, as adding 1.5 * 2^23 in float32 does), clamped to [lo, hi].

    Levels stay float32 (small integers are exact): the sums they enter are float32 anyway.
    """
    out = np.rint(f)
    return np.clip(out, F32(lo), F32(hi), out=out)


def _seq_sum(a: np.ndarray) -> np.ndarray:
    """Sum over axis 0 in float32, strictly in order as the C loop does (numpy's sum is pairwise).

    Arrays are laid out [values of a sub-block, sub-blocks]: each step adds one contiguous row.
    """
    out = a[0].astype(F32, copy=True)
    for row in a[1:]:
        out += row
    return out


def _fp16(x: np.ndarray) -> np.ndarray:
    return x.astype(F32).astype(np.float16)


def _make_qkx2(
    x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scale, min and levels (0..nmax) per sub-block (columns of `x` [n, S]): ggml's `make_qkx2_quants`."""
    mn = np.minimum(x.min(axis=0), F32(0))
    mx = x.max(axis=0)
    sum_w = _seq_sum(w)
    sum_x = _seq_sum(w * x)
    flat = mx == mn

    def err(diff: np.ndarray) -> np.ndarray:
        diff = np.abs(diff, out=diff) if use_mad else np.multiply(diff, diff, out=diff)
        return _seq_sum(np.multiply(w, diff, out=diff))

    iscale = F32(nmax) / (mx - mn)
    scale = F32(1) / iscale
    levels = _rint(iscale * (x - mn), 0, nmax)
    best = err(scale * levels + mn - x)
    for step in range(nstep + 1):
        # The reference updates `min` when a step improves, and later steps start from it.
        iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (mx - mn)
        aux = _rint(iscale * (x - mn), 0, nmax)
        wl = w * aux
        sum_l, sum_l2, sum_xl = _seq_sum(wl), _seq_sum(wl * aux), _seq_sum(np.multiply(wl, x, out=wl))
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0
        this_min = np.where(positive, F32(0), this_min)
        this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
        cur = err(this_scale * aux + this_min - x)
        better = (det > 0) & (cur < best) & ~flat
        if better.any():
            np.copyto(levels, aux, where=better)
            best = np.where(better, cur, best)
            scale = np.where(better, this_scale, scale)
            mn = np.where(better, this_min, mn)
    scale = np.where(flat, F32(0), scale)
    np.copyto(levels, F32(0), where=flat)
    return scale.astype(F32), (-mn).astype(F32), levels


def _abs_argmax(x: np.ndarray) -> np.ndarray:
    """The element of largest magnitude per column (the first one on ties), with its sign."""
    return np.take_along_axis(x, np.abs(x).argmax(axis=0)[None, :], axis=0)[0]


def _make_qx(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale and levels (0..2 nmax - 1) per column of `x` [n, S], weights x^2: `make_qx_quants(rmse_type=1)`."""
    mx = _abs_argmax(x)
    zero = np.abs(mx) < GROUP_MAX_EPS
    w = x * x
    wx = w * x

    def levels_for(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lv = _rint(iscale * x, -nmax, nmax - 1)
        return lv, _seq_sum(wx * lv), _seq_sum(w * lv * lv)

    levels, sumlx, suml2 = levels_for(F32(-nmax) / mx)
    scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        lv, sumlx, suml2 = levels_for(-(F32(nmax) + F32(0.1) * F32(step)) / mx)
        update = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        np.copyto(levels, lv, where=update)
        scale = np.where(update, sumlx / suml2, scale)
        best = np.where(update, scale * sumlx, best)
    levels += F32(nmax)
    np.copyto(levels, F32(0), where=zero)
    return np.where(zero, F32(0), scale).astype(F32), levels


def _make_q3(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale and levels (0..2 nmax - 1) per column: ggml's `make_q3_quants(do_rmse=true)`, coordinate descent."""
    mx = _abs_argmax(x)
    zero = np.abs(mx) < GROUP_MAX_EPS
    lv = _rint((F32(-nmax) / mx) * x, -nmax, nmax - 1)
    w = x * x
    wx = w * x
    sumlx, suml2 = _seq_sum(wx * lv), _seq_sum(w * lv * lv)
    # A pass that changes nothing leaves the state as it was, so running all 5 passes equals stopping early.
    for _ in range(5):
        for i in range(x.shape[0]):
            li = lv[i]
            slx = sumlx - wx[i] * li
            sl2 = suml2 - w[i] * li * li
            new = _rint(x[i] * sl2 / slx, -nmax, nmax - 1)
            slx2 = slx + wx[i] * new
            sl22 = sl2 + w[i] * new * new
            take = (slx > 0) & (new != li) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            np.copyto(li, new, where=take)
            sumlx = np.where(take, slx2, sumlx)
            suml2 = np.where(take, sl22, suml2)
    scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    lv += F32(nmax)
    np.copyto(lv, F32(0), where=zero)
    return np.where(zero, F32(0), scale).astype(F32), lv


def _int(v: np.ndarray) -> np.ndarray:
    """Float32 results of `nearest_int` as int32 (the lanes that can hold NaN are masked by the caller)."""
    return np.rint(v).astype(np.int32)


def _u8(v: np.ndarray) -> np.ndarray:
    """C's int -> uint8_t conversion (modulo 256)."""
    return (v & 0xFF).astype(np.uint8)


def _sub_blocks(x: np.ndarray, n: int) -> np.ndarray:
    """Super-blocks [nb, 256] as sub-blocks laid out [n values, nb * 256 / n sub-blocks] (see `_seq_sum`)."""
    return np.ascontiguousarray(x.reshape(-1, n).T)


def _levels(lt: np.ndarray, nb: int) -> np.ndarray:
    """Levels [n, sub-blocks] back to [nb, 256] as uint8."""
    return np.ascontiguousarray(lt.T).reshape(nb, QK_K).astype(np.uint8)


def _pack_2bit(levels: np.ndarray, nb: int) -> np.ndarray:
    """Q2_K / Q3_K low bits: byte l of each 128-value half holds values l, l+32, l+64, l+96 (2 bits each)."""
    lv = levels.reshape(nb, 2, 4, 32)
    return (lv[:, :, 0] | (lv[:, :, 1] << 2) | (lv[:, :, 2] << 4) | (lv[:, :, 3] << 6)).reshape(nb, 64)


def _bytes(*parts: np.ndarray) -> np.ndarray:
    return np.concatenate([p.view(np.uint8).reshape(p.shape[0], -1) for p in parts], axis=1)


def _k_scales(scales: np.ndarray, mins: np.ndarray, nb: int) -> tuple[np.ndarray, ...]:
    """Q4_K / Q5_K: 6-bit sub-block scales and mins against fp16 super-block scales, packed into 12 bytes."""
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
    inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
    ls = np.minimum(_u8(_int(inv_scale[:, None] * scales)), 63)
    lm = np.minimum(_u8(_int(inv_min[:, None] * mins)), 63)
    packed = np.concatenate(
        [
            ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
            lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
            (ls[:, 4:] & 15) | ((lm[:, 4:] & 15) << 4),
        ],
        axis=1,
    )
    d = _fp16(max_scale / F32(63))
    dmin = _fp16(max_min / F32(63))
    return d, dmin, packed, ls, lm


def _requant(xt: np.ndarray, levels: np.ndarray, d: np.ndarray, dm: np.ndarray | None, lo: int, hi: int) -> None:
    """Levels against the stored scales, in place: round((x + dm) / d) (or x / d); sub-blocks whose stored
    scale is 0 keep the levels of their search, as the reference does."""
    new = _rint((xt + dm) / d if dm is not None else xt / d, lo, hi)
    np.copyto(levels, new, where=d != 0)


def _q4k_q5k(x: np.ndarray, nmax: int, rmin: float, nstep: int) -> tuple[np.ndarray, ...]:
    nb = x.shape[0]
    xt = _sub_blocks(x, 32)
    av_x = np.sqrt(_seq_sum(xt * xt) / F32(32))
    w = av_x + np.abs(xt)
    scales, mins, levels = _make_qkx2(xt, w, nmax, rmin, 0.1, nstep, False)
    d, dmin, packed, ls, lm = _k_scales(scales, mins, nb)
    dd = (d.astype(F32)[:, None] * ls.astype(F32)).reshape(-1)
    dm = (dmin.astype(F32)[:, None] * lm.astype(F32)).reshape(-1)
    _requant(xt, levels, dd, dm, 0, nmax)
    return d, dmin, packed, _levels(levels, nb).reshape(nb, 4, 2, 32)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    d, dmin, packed, lv = _q4k_q5k(x, 15, -1.0, 20)
    qs = (lv[:, :, 0] | (lv[:, :, 1] << 4)).reshape(x.shape[0], 128)
    return _bytes(d, dmin, packed, qs)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    d, dmin, packed, lv = _q4k_q5k(x, 31, -0.5, 15)
    high = lv >> 4  # [nb, 4 chunks of 64, 2 halves, 32]
    shifts = (2 * np.arange(4, dtype=np.uint8))[None, :, None]
    qh = ((high[:, :, 0] << shifts) | (high[:, :, 1] << (shifts + 1))).sum(axis=1, dtype=np.uint8)
    qs = ((lv[:, :, 0] & 15) | ((lv[:, :, 1] & 15) << 4)).reshape(nb, 128)
    return _bytes(d, dmin, packed, qh, qs)


def _by_block_signed_max(scales: np.ndarray, nb: int) -> tuple[np.ndarray, np.ndarray]:
    """The 16 sub-block scales of each block, and the one of largest magnitude with its sign (ggml's max_scale)."""
    scales = scales.reshape(nb, 16)
    return scales, np.take_along_axis(scales, np.abs(scales).argmax(axis=1)[:, None], axis=1)[:, 0]


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    xt = _sub_blocks(x, 16)
    scales, levels = _make_qx(xt, 32)
    scales, max_scale = _by_block_signed_max(scales, nb)
    zero = np.abs(max_scale) < GROUP_MAX_EPS
    iscale = F32(-128) / max_scale
    d = _fp16(np.where(zero, F32(0), F32(1) / iscale))
    sc = np.where(zero[:, None], 0, np.minimum(127, _int(iscale[:, None] * scales))).astype(np.int8)
    dd = (d.astype(F32)[:, None] * sc.astype(F32)).reshape(-1)
    _requant(xt, levels, dd, None, -32, 31)
    levels += F32(32) * (dd != 0)  # requantized levels are signed; the search's are already offset
    lv = _levels(levels, nb)
    lv[zero] = 0
    lv = lv.reshape(nb, 2, 4, 32)
    low, high = lv & 15, lv >> 4
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    return _bytes(ql.reshape(nb, 128), qh.reshape(nb, 64), sc, d)


def quantize_q2_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    xt = _sub_blocks(x, 16)
    scales, mins, levels = _make_qkx2(xt, np.abs(xt), 3, -0.5, 0.1, 15, True)
    scales, mins = scales.reshape(nb, 16), mins.reshape(nb, 16)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    sc = np.where((max_scale > 0)[:, None], _int((F32(15) / max_scale)[:, None] * scales), 0)
    lm = np.where((max_min > 0)[:, None], _int((F32(15) / max_min)[:, None] * mins), 0)
    packed = _u8(sc) | _u8(lm << 4)
    d = _fp16(np.where(max_scale > 0, max_scale / F32(15), F32(0)))
    dmin = _fp16(np.where(max_min > 0, max_min / F32(15), F32(0)))
    dd = (d.astype(F32)[:, None] * (packed & 15).astype(F32)).reshape(-1)
    dm = (dmin.astype(F32)[:, None] * (packed >> 4).astype(F32)).reshape(-1)
    _requant(xt, levels, dd, dm, 0, 3)
    return _bytes(packed, _pack_2bit(_levels(levels, nb), nb), d, dmin)


def quantize_q3_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    xt = _sub_blocks(x, 16)
    scales, levels = _make_q3(xt, 4)
    scales, max_scale = _by_block_signed_max(scales, nb)
    some = max_scale != 0
    iscale = F32(-32) / max_scale
    raw = _int(iscale[:, None] * scales)
    ls = np.where(some[:, None], np.clip(((raw + 128) & 0xFF) - 128, -32, 31) + 32, 0).astype(np.uint8)
    d = _fp16(np.where(some, F32(1) / iscale, F32(0)))
    low, high = ls & 15, ls >> 4  # [nb, 16]
    shifts = (2 * np.arange(4, dtype=np.uint8))[None, :, None]
    packed = np.concatenate(
        [low[:, :8] | (low[:, 8:] << 4), (high.reshape(nb, 4, 4) << shifts).sum(axis=1, dtype=np.uint8)], axis=1
    )
    sc = ls.astype(F32) - F32(32)  # all-zero scale bytes decode to -32 (times d = 0)
    dd = (d.astype(F32)[:, None] * sc).reshape(-1)
    _requant(xt, levels, dd, None, -4, 3)
    levels += F32(4) * (dd != 0)
    lv = _levels(levels, nb)
    high_bit = (lv > 3).astype(np.uint8)
    lv -= 4 * high_bit
    hmask = (high_bit.reshape(nb, 8, 32) << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1, dtype=np.uint8)
    return _bytes(hmask, _pack_2bit(lv, nb), packed, d)


K_QUANTIZERS = {
    Q.Q2_K: quantize_q2_k,
    Q.Q3_K: quantize_q3_k,
    Q.Q4_K: quantize_q4_k,
    Q.Q5_K: quantize_q5_k,
    Q.Q6_K: quantize_q6_k,
}
# Types gguf-py quantizes itself (bit-exact ggml reference implementations).
GGUF_PY_QUANTIZERS = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0)
EDITABLE = (*PLAIN, *GGUF_PY_QUANTIZERS, *K_QUANTIZERS)


def can_quantize(qtype: GGMLQuantizationType) -> bool:
    return qtype in EDITABLE


def row_bytes(qtype: GGMLQuantizationType, n_per_row: int) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return n_per_row // block * size


def quantize(rows: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """float32 rows [n, n_per_row] -> the stored bytes [n, row_bytes] of `qtype`."""
    rows = np.ascontiguousarray(rows, dtype=F32)
    n, per_row = rows.shape
    if qtype == Q.F32:
        return rows.view(np.uint8)
    if qtype == Q.F64:
        return rows.astype(np.float64).view(np.uint8)
    if qtype in (Q.F16, Q.BF16, *GGUF_PY_QUANTIZERS):
        out = gquants.quantize(rows, qtype)
        return np.ascontiguousarray(out).view(np.uint8).reshape(n, -1)
    fn = K_QUANTIZERS.get(qtype)
    if fn is None:
        raise RefusalEditError(f"cannot quantize to {qtype.name}")
    if per_row % QK_K:
        raise RefusalEditError(f"rows of {per_row} values cannot be stored as {qtype.name} (blocks of {QK_K})")
    blocks = rows.reshape(-1, QK_K)
    out = np.empty((blocks.shape[0], GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
    with np.errstate(all="ignore"):  # masked lanes (all-zero sub-blocks) divide by zero; never used
        for s in range(0, blocks.shape[0], BATCH_BLOCKS):
            out[s : s + BATCH_BLOCKS] = fn(blocks[s : s + BATCH_BLOCKS])
    return out.reshape(n, -1)


def dequantize(data: np.ndarray, qtype: GGMLQuantizationType, n_per_row: int) -> np.ndarray:
    """Stored bytes of whole rows -> float32 [n, n_per_row] (gguf-py's dequantizers)."""
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1, row_bytes(qtype, n_per_row))
    if qtype == Q.F64:
        return raw.view(np.float64).astype(F32)
    try:
        out = gquants.dequantize(raw, qtype)
    except NotImplementedError:
        raise RefusalEditError(f"gguf-py cannot read {qtype.name} tensors") from None
    out = np.asarray(out, dtype=F32).reshape(-1, n_per_row)
    # F32 "dequantizes" to a view of the stored bytes - a read-only memory map of the input: the editor works in
    # place on what this returns (writing into it crashed the process), so hand out a private copy.
    return out if out.flags.writeable else out.copy()
