"""Writing llama.cpp's K-quant blocks (Q4_K, Q5_K, Q6_K) from float weights, vectorised over blocks.

quant/ggml.py reads these formats; this is the other direction, for ``gemmakit quantize``'s
llama.cpp mixes. The layouts are ggml-common.h's ``block_q4_K`` / ``block_q5_K`` / ``block_q6_K``
(quant/ggml.py's table gives the byte offsets). The choice of scales follows the search of
llama.cpp's reference quantiser without an importance matrix (``quantize_row_q*_K_ref``):

* Q4_K / Q5_K: each 32-weight group gets a scale and a min by a least-squares fit weighted by
  ``rms(group) + |x|``, tried over a sweep of candidate level spacings (21 for Q4_K, 16 for Q5_K),
  keeping the one with the least weighted squared error; the eight scales and mins of a 256-weight
  super-block are then rounded to 6 bits against the block's largest (fp16 ``d`` and ``dmin``).
* Q6_K: each 16-weight group gets a symmetric scale fitted with weights ``x^2`` over 19 candidate
  spacings; the sixteen scales become int8 against the block's largest-magnitude one.

Finally every weight is rounded to the nearest level of its *stored* (rounded) scale, so what a
reader decodes is the best the stored scales allow. Every array is float32 as in ggml (a
candidate's error aside, taken in float64 from sums already at hand); rounding is to nearest, ties
to even (ggml's ``nearest_int``). So 97-98% of the blocks are llama.cpp's bytes, the rest differ
where a sum taken in another order tips a near-equal candidate, and the error is llama.cpp's.

Work goes a slab of rows at a time (about a million weights), so memory stays a few slab-sized
temporaries whatever the tensor.
"""

from __future__ import annotations

import numpy as np

__all__ = ["quantize_q4_k", "quantize_q5_k", "quantize_q6_k", "K_QUANTISERS"]

QK_K = 256
_SLAB_WEIGHTS = 1 << 20
_EPS = 1e-15  # ggml's GROUP_MAX_EPS: a group whose absmax is below it is all zeros

f32 = np.float32


def _rows(w: np.ndarray) -> np.ndarray:
    w = np.ascontiguousarray(w, dtype=f32)
    if w.ndim == 0 or w.shape[-1] % QK_K:
        raise ValueError(f"K-quant rows must be a multiple of {QK_K} weights, got shape {w.shape}")
    return w.reshape(-1, w.shape[-1])


def _by_slab(w: np.ndarray, block_bytes: int, encode) -> np.ndarray:
    """Run ``encode([n_blocks, 256] float32) -> [n_blocks, block_bytes] uint8`` over slabs of rows."""
    rows = _rows(w)
    per_row = rows.shape[1] // QK_K
    out = np.empty((rows.shape[0], per_row * block_bytes), dtype=np.uint8)
    step = max(1, _SLAB_WEIGHTS // rows.shape[1])
    for start in range(0, rows.shape[0], step):
        x = rows[start:start + step].reshape(-1, QK_K)
        out[start:start + step] = encode(x).reshape(-1, per_row * block_bytes)
    return out.reshape(*w.shape[:-1], per_row * block_bytes)


def _fit_scale_min(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int) -> tuple[np.ndarray, np.ndarray]:
    """Per group (rows of ``x``, [G, n]): the scale and (positive) min of levels ``0..nmax`` that
    best fit it in weighted least squares, ``x ~ scale * l - min``; llama.cpp's make_qkx2 search."""
    weights = np.sqrt(np.mean(x * x, axis=1, keepdims=True, dtype=f32)).astype(f32) + np.abs(x)
    lo = np.minimum(x.min(axis=1, keepdims=True), f32(0))
    hi = x.max(axis=1, keepdims=True)
    span = hi - lo
    flat = span == 0
    span = np.where(flat, f32(1), span)
    sum_w = weights.sum(axis=1, keepdims=True, dtype=f32)
    sum_x = (weights * x).sum(axis=1, keepdims=True, dtype=f32)

    sum_xx = (weights * x * x).sum(axis=1, keepdims=True, dtype=np.float64)

    def error(sum_l, sum_l2, sum_xl, scale, offset):
        # sum w (scale*l + offset - x)^2 expanded into the sums already at hand (float64 against
        # the cancellation), which saves four passes over the weights per candidate.
        s, m = scale.astype(np.float64), offset.astype(np.float64)
        return (s * s * sum_l2 + m * m * sum_w + sum_xx + 2 * s * m * sum_l - 2 * s * sum_xl - 2 * m * sum_x)

    def sums(levels):
        wl = weights * levels
        return (wl.sum(axis=1, keepdims=True, dtype=f32), (wl * levels).sum(axis=1, keepdims=True, dtype=f32),
                (wl * x).sum(axis=1, keepdims=True, dtype=f32))

    iscale = f32(nmax) / span
    scale = f32(1) / iscale
    levels = np.clip(np.rint(iscale * (x - lo)), 0, nmax)
    best = error(*sums(levels), scale, lo)
    offset = lo.copy()
    for step in range(nstep + 1):
        # As in llama.cpp, each candidate spaces its levels from the best offset found so far.
        span = hi - offset
        span = np.where(span == 0, f32(1), span)
        iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / span
        levels = x - offset
        levels *= iscale
        np.rint(levels, out=levels)
        np.clip(levels, 0, nmax, out=levels)
        sum_l, sum_l2, sum_xl = sums(levels)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        safe = np.where(ok, det, f32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        positive = this_min > 0  # the fit wants a positive offset: pin it to zero and refit the scale
        this_scale = np.where(positive, sum_xl / np.where(sum_l2 > 0, sum_l2, f32(1)), this_scale)
        this_min = np.where(positive, f32(0), this_min)
        cur = error(sum_l, sum_l2, sum_xl, this_scale, this_min)
        better = ok & (cur < best)
        best = np.where(better, cur, best)
        scale = np.where(better, this_scale, scale)
        offset = np.where(better, this_min, offset)
    scale = np.where(flat, f32(0), scale)
    return scale[:, 0].astype(f32), (-offset[:, 0]).astype(f32)


def _pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins per block ([n, 8] each, 0..63) -> the 12 bytes of Q4_K/Q5_K."""
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4)
    return out


def _k_levels(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """The shared half of Q4_K and Q5_K: (d, dmin as fp16 [n], packed scales [n, 12], levels [n, 256])."""
    n = x.shape[0]
    groups = x.reshape(n * 8, 32)
    scales, mins = _fit_scale_min(groups, nmax, rmin, rdelta, nstep)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    max_scale = np.maximum(scales.max(axis=1, keepdims=True), f32(0))
    max_min = np.maximum(mins.max(axis=1, keepdims=True), f32(0))
    inv_scale = np.where(max_scale > 0, f32(63) / np.where(max_scale > 0, max_scale, f32(1)), f32(0))
    inv_min = np.where(max_min > 0, f32(63) / np.where(max_min > 0, max_min, f32(1)), f32(0))
    ls = np.clip(np.rint(inv_scale * scales), 0, 63)
    lm = np.clip(np.rint(inv_min * mins), 0, 63)
    d = (max_scale / f32(63)).astype(np.float16)
    dmin = (max_min / f32(63)).astype(np.float16)
    # Levels against the stored scales, exactly as a reader will decode them.
    dq = (d.astype(f32) * ls.astype(f32))[:, :, None]
    mq = (dmin.astype(f32) * lm.astype(f32))[:, :, None]
    safe = np.where(dq == 0, f32(1), dq)
    levels = np.clip(np.rint((x.reshape(n, 8, 32) + mq) / safe), 0, nmax)
    levels = np.where(dq == 0, f32(0), levels).astype(np.uint8).reshape(n, 256)
    return d[:, 0], dmin[:, 0], _pack_k_scales(ls, lm), levels


def _encode_q4_k(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    d, dmin, scales, levels = _k_levels(x, 15, -1.0, 0.1, 20)
    pairs = levels.reshape(n, 4, 2, 32)  # 64 weights a byte run: the first 32 low nibbles, the next high
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(n, 128)
    out = np.empty((n, 144), dtype=np.uint8)
    out[:, 0:2] = d.view(np.uint8).reshape(n, 2)
    out[:, 2:4] = dmin.view(np.uint8).reshape(n, 2)
    out[:, 4:16] = scales
    out[:, 16:144] = qs
    return out


def _encode_q5_k(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    d, dmin, scales, levels = _k_levels(x, 31, -0.5, 0.1, 15)
    low = (levels & 0xF).reshape(n, 4, 2, 32)
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128)
    # Bit k of qh[j] is the fifth bit of weight 32k + j.
    high = (levels >> 4).reshape(n, 8, 32)
    qh = np.zeros((n, 32), dtype=np.uint8)
    for k in range(8):
        qh |= high[:, k] << k
    out = np.empty((n, 176), dtype=np.uint8)
    out[:, 0:2] = d.view(np.uint8).reshape(n, 2)
    out[:, 2:4] = dmin.view(np.uint8).reshape(n, 2)
    out[:, 4:16] = scales
    out[:, 16:48] = qh
    out[:, 48:176] = qs
    return out


def _fit_symmetric(x: np.ndarray, nmax: int) -> np.ndarray:
    """Per group ([G, n]) the scale of levels ``-nmax..nmax-1`` fitting it best with weights x^2,
    over 19 candidate spacings around ``absmax / nmax`` (llama.cpp's make_qx_quants, rmse_type 1)."""
    pick = np.abs(x).argmax(axis=1)
    peak = np.take_along_axis(x, pick[:, None], axis=1)  # the signed value of largest magnitude
    zero = np.abs(peak) < _EPS
    peak = np.where(zero, f32(1), peak)
    weights = x * x
    wx = weights * x

    def fit(iscale):
        levels = np.clip(np.rint(iscale * x), -nmax, nmax - 1).astype(f32)
        sumlx = (wx * levels).sum(axis=1, keepdims=True, dtype=f32)
        suml2 = (weights * levels * levels).sum(axis=1, keepdims=True, dtype=f32)
        return sumlx, suml2

    sumlx, suml2 = fit(f32(-nmax) / peak)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, f32(1)), f32(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        sumlx, suml2 = fit(-(f32(nmax) + f32(0.1) * f32(step)) / peak)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        this = sumlx / np.where(suml2 > 0, suml2, f32(1))
        scale = np.where(better, this, scale)
        best = np.where(better, this * sumlx, best)
    return np.where(zero, f32(0), scale)[:, 0]


def _encode_q6_k(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    scales = _fit_symmetric(x.reshape(n * 16, 16), 32).reshape(n, 16)
    pick = np.abs(scales).argmax(axis=1)
    max_scale = np.take_along_axis(scales, pick[:, None], axis=1)
    empty = np.abs(max_scale) < _EPS
    iscale = f32(-128) / np.where(empty, f32(1), max_scale)
    d = np.where(empty, f32(0), f32(1) / iscale).astype(np.float16)
    sc = np.where(empty, f32(0), np.minimum(np.rint(iscale * scales), 127)).astype(np.int8)
    dq = (d.astype(f32) * sc.astype(f32))[:, :, None]
    safe = np.where(dq == 0, f32(1), dq)
    levels = np.clip(np.rint(x.reshape(n, 16, 16) / safe), -32, 31) + 32
    levels = np.where(dq == 0, f32(32), levels).astype(np.uint8).reshape(n, 2, 4, 32)
    low = levels & 0xF
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    high = levels >> 4
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    out = np.empty((n, 210), dtype=np.uint8)
    out[:, 0:128] = ql.reshape(n, 128)
    out[:, 128:192] = qh.reshape(n, 64)
    out[:, 192:208] = sc.view(np.uint8)
    out[:, 208:210] = d.view(np.uint8).reshape(n, 2)
    return out


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """Float rows ``[..., K]`` (K a multiple of 256) -> Q4_K blocks ``[..., K / 256 * 144]`` uint8."""
    return _by_slab(w, 144, _encode_q4_k)


def quantize_q5_k(w: np.ndarray) -> np.ndarray:
    """Float rows ``[..., K]`` (K a multiple of 256) -> Q5_K blocks ``[..., K / 256 * 176]`` uint8."""
    return _by_slab(w, 176, _encode_q5_k)


def quantize_q6_k(w: np.ndarray) -> np.ndarray:
    """Float rows ``[..., K]`` (K a multiple of 256) -> Q6_K blocks ``[..., K / 256 * 210]`` uint8."""
    return _by_slab(w, 210, _encode_q6_k)


# GGML type name -> quantiser
K_QUANTISERS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}
