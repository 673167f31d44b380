"""The lowered multi-bit convolution: bit-serial, on the 1-bit kernel's tiles (kernels/bitconv.py).

Conv(Σ_j s_j·B_j(X), Σ_i α_i·B_i(W)) = Σ_j s_j · Σ_i α_i ⊙ Conv(B_j, B_i). The Kw weight planes are packed side by
side as Kw·O output channels; the Ka activation planes are packed in one pass over X into Ka copies of the 1-bit
kernel's packed layout (B_j = b(R_j) with R_(j+1) = R_j − s_j·B_j needs only the scales before it, so once the Ka
per-sample scales are known, each element's residual chain gives all its bits). One parallel job per
(sample, output row, channel group) then runs the 1-bit register tile for each of the Kw × Ka plane pairs and adds
each pair's sums, scaled by α_i·s_j, into a float row kept in L1: no float tensor between the passes and one
parallel region for the convolution. Zero padding stays exact (the 1-bit kernel's correction, per weight plane).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import bitconv

CHUNKS = 16  # pieces per sample for the scale reductions, so that a batch of 1 uses every thread too
BLOCK = 2048  # elements per residual buffer in those reductions: stays in L1


@njit(cache=True, nogil=True, inline="always")
def _step(v, s):
    """R − s·b(R) for one element, b(v) = +1 if v > 0 else −1 (float32, as reference.residual_planes)."""
    return v - s if v > 0 else v + s


# fastmath "reassoc" lets the float64 |R| sums vectorize (a serial chain of adds ran at 4 cycles an element);
# the order of a float64 sum of float32 values does not show after rounding to float32
@njit(parallel=True, cache=True, nogil=True, fastmath={"reassoc"})
def leading_scales(x, scales):
    """scales[j, n] = mean |R_j| of sample n (R_1 = x) for every level but the last (pack_levels sums that one's
    residual while it packs). Accumulated in float64 and rounded once, as reference.residual_planes does (float64
    partial sums make the summation order irrelevant at float32 precision). One pass over x per level; each
    recomputes the residual chain before it in a buffer, so the loops vectorize."""
    n = x.shape[0]
    flat = x.reshape(n, -1)
    size = flat.shape[1]
    step = -(-size // CHUNKS)
    partial = np.zeros((n, CHUNKS))
    for j in range(scales.shape[0] - 1):
        for job in prange(n * CHUNKS):
            i, c = job // CHUNKS, job % CHUNKS
            residual = np.empty(BLOCK, np.float32)
            total = 0.0
            for k0 in range(c * step, min(size, (c + 1) * step), BLOCK):
                k1 = min(k0 + BLOCK, (c + 1) * step, size)
                block = residual[:k1 - k0]
                block[:] = flat[i, k0:k1]
                for p in range(j):
                    s = scales[p, i]
                    for k in range(block.size):
                        block[k] = _step(block[k], s)
                for k in range(block.size):
                    total += abs(block[k])
            partial[i, c] = total
        for i in range(n):
            scales[j, i] = np.float32(partial[i].sum() / size)


@njit(parallel=True, cache=True, nogil=True, fastmath={"reassoc"})  # as leading_scales
def pack_levels(x, scales, pt, pl, out):
    """float (N, C, H, W) → the sign bits of its residual planes, out[j] as bitconv.pack_input lays plane j out
    (out's border must be zero); the residual row is kept in a small buffer so each level's compare vectorizes.
    Plane j's bits need the scales before it only; the last level's scale is filled in here, from its residual."""
    n, c, h, w = x.shape
    levels, words = out.shape[0], out.shape[3]
    partial = np.zeros((n, h))
    for job in prange(n * h):
        i = job // h
        r = job - i * h
        residual = np.empty(w, np.float32)
        total = 0.0
        for word in range(words):
            for b in range(min(64, c - word * 64)):
                shift = np.uint64(b)
                residual[:] = x[i, word * 64 + b, r]
                for j in range(levels - 1):
                    row = out[j, i, pt + r, word, pl:pl + w]
                    s = scales[j, i]
                    for col in range(w):
                        v = residual[col]
                        row[col] |= np.uint64(v > 0) << shift
                        residual[col] = _step(v, s)
                row = out[levels - 1, i, pt + r, word, pl:pl + w]
                for col in range(w):
                    row[col] |= np.uint64(residual[col] > 0) << shift
                    total += abs(residual[col])
        partial[i, r] = total
    if levels > 1:  # Ka = 1 is b(X) with no scale
        for i in range(n):
            scales[levels - 1, i] = np.float32(partial[i].sum() / (c * h * w))


@njit(cache=True, nogil=True, inline="always")
def _add_pair(sums, plane, k0, k1, r, base, starts, cols, patterns, excess, alpha, level_scale, acc):
    """acc[k − k0, col] += s_j·α_i[k]·(base − 2·sum) for one (weight plane i, activation plane j) pair, after taking
    out what padded taps added (excess columns plane·O + k: weight plane i's bits)."""
    bitconv.remove_padding(sums, k0, k1, plane * alpha.shape[1], r, starts, cols, patterns, excess)
    ow = acc.shape[1]
    two = np.float32(2)
    for k in range(k0, k1):
        scale = alpha[plane, k] * level_scale
        for col in range(ow):
            # integers below 2²⁴ are exact in float32: the exact ±1 sum, scaled once
            acc[k - k0, col] += (np.float32(base[r, col]) - two * np.float32(sums[k - k0, col])) * scale


@njit(parallel=True, cache=True, nogil=True)
def conv_levels(xp, wp, taps_pop, alpha, scales, bias, channels, sh, sw, pt, pl, h, w, dh, dw, out):
    """out (N, O, OH, OW) = Σ_j s_j Σ_i α_i·(valid_taps·C − 2·Σ popcount(x_j ⊕ w_i)) + bias; xp from pack_levels,
    wp [kh, kw, words, Kw·O], alpha [Kw, O], scales [Ka, N]."""
    levels_x, n, rows, cw, cols = xp.shape
    kh, kw, _, total = wp.shape
    levels_w, o = alpha.shape
    oh, ow = out.shape[2], out.shape[3]
    wflat = wp.reshape(-1)
    offsets = bitconv.tap_offsets(kh, kw, cw, dh, dw, cols)
    group = bitconv.GROUP_CHANNELS
    groups = (o + group - 1) // group
    tiles = (ow + bitconv.TILE_PIXELS - 1) // bitconv.TILE_PIXELS
    base, starts, border_cols, patterns, excess = bitconv.padding_terms(channels, taps_pop, sh, sw, pt, pl, dh, dw,
                                                                         h, w, oh, ow)
    plane_words = n * rows * cw * cols
    xflat = xp.reshape(-1)
    per_job = bitconv.rows_per_job(ow)
    row_jobs = (oh + per_job - 1) // per_job
    for job in prange(n * row_jobs * groups):
        g, i, r, r2 = bitconv.job_rows(job, groups, row_jobs, per_job, oh)
        g0, g1 = g * group, min(o, (g + 1) * group)
        next_row = (r2 - r) * sh * cw * cols if per_job == 2 else -1
        sums = np.empty((group, tiles * bitconv.TILE_PIXELS), np.int32)
        acc = np.zeros((per_job, group, ow), np.float32)  # the job's rows
        for j in range(levels_x):
            row_origin = j * plane_words + (i * rows + r * sh) * cw * cols
            for plane in range(levels_w):
                first = plane * o
                bitconv.channel_tiles(xflat, wflat, offsets, row_origin, next_row, sw, total, first + g0,
                                      first + g1, first + o - 1, tiles, sums.reshape(-1))
                _add_pair(sums, plane, g0, g1, r, base, starts, border_cols, patterns, excess, alpha, scales[j, i],
                          acc[0])
                if r2 != r:
                    _add_pair(sums[:, bitconv.TILE_PIXELS // 2:], plane, g0, g1, r2, base, starts, border_cols,
                              patterns, excess, alpha, scales[j, i], acc[1])
        for k in range(g0, g1):
            out[i, k, r, :] = acc[0, k - g0] + bias[k]
            if r2 != r:
                out[i, k, r2, :] = acc[1, k - g0] + bias[k]


@njit(cache=True, nogil=True)
def multibit_bit_conv_into(x, wp, alpha, bias, geometry, out):
    """x float32 (N, C, H, W); wp uint64 [kh, kw, words, Kw·O]; alpha [Kw, O]; bias [O]; geometry: 11 + [Ka];
    out (N, O, oh, ow) as bitconv.output_shape gives it."""
    n, _, h, w = x.shape
    kh, kw, cw, _ = wp.shape
    sh, sw, dh, dw, channels, levels_x = geometry[1], geometry[2], geometry[7], geometry[8], geometry[10], geometry[11]
    pt, pl, oh, ow = bitconv.placement(h, w, kh, kw, geometry)
    scales = np.ones((levels_x, n), np.float32)
    leading_scales(x, scales)
    shape = bitconv.padded_input_shape(n, h, w, cw, pt, pl, oh, ow, kh, kw, sh, sw, dh, dw)
    xp = np.zeros((levels_x, shape[0], shape[1], shape[2], shape[3]), np.uint64)
    pack_levels(x, scales, pt, pl, xp)
    conv_levels(xp, wp, bitconv.tap_popcounts(wp), alpha, scales, bias, channels, sh, sw, pt, pl, h, w, dh, dw, out)


def multibit_bit_conv(x: np.ndarray, wp: np.ndarray, alpha: np.ndarray, bias: np.ndarray,
                      geometry: np.ndarray) -> np.ndarray:
    """multibit_bit_conv_into a new array."""
    kh, kw = wp.shape[:2]
    x = np.ascontiguousarray(x)
    out = np.empty(bitconv.output_shape(x.shape[0], x.shape[2], x.shape[3], kh, kw, alpha.shape[1], geometry),
                   np.float32)
    multibit_bit_conv_into(x, wp, np.ascontiguousarray(alpha, dtype=np.float32), bias, geometry, out)
    return out
