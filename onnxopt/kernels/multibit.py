"""The lowered multi-bit convolution, bit-serial on the 1-bit kernel (kernels/bitconv.py).

Conv(Σ_j s_j·B_j(X), Σ_i α_i·B_i(W)) = Σ_j s_j · Σ_i α_i ⊙ Conv(B_j, B_i): the Kw weight planes are packed side by side
as Kw·O output channels, so one pass of the 1-bit kernel per activation level computes every weight level at once
with the kernel's own tiling and packing (Ka passes in all, each Kw·O channels wide). The 1-bit kernel binarizes
its float input itself, so each pass is given the residual R_j, whose signs are B_j. Zero padding stays exact
(the kernel's). Between passes, one parallel sweep makes the next residual and its per-sample mean, and one more
adds the pass's Kw column blocks, scaled by the sample's s_j, into the output (numpy took two thirds of the time
with its temporaries).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import bitconv


CHUNKS = 16  # pieces per sample, so that a batch of 1 uses every thread too


@njit(parallel=True, cache=True, nogil=True)
def mean_abs(r):
    """Per sample, mean |r| accumulated in float64 and rounded once (reference.residual_planes does the same;
    float64 partial sums make the order of summation irrelevant at float32 precision)."""
    n = r.shape[0]
    flat = r.reshape(n, -1)
    size = flat.shape[1]
    step = -(-size // CHUNKS)
    partial = np.zeros((n, CHUNKS))
    for job in prange(n * CHUNKS):
        i, c = job // CHUNKS, job % CHUNKS
        total = 0.0
        for k in range(c * step, min(size, (c + 1) * step)):
            total += abs(flat[i, k])
        partial[i, c] = total
    out = np.empty(n, np.float32)
    for i in range(n):
        out[i] = np.float32(partial[i].sum() / size)
    return out


@njit(parallel=True, cache=True, nogil=True)
def next_residual(r, s):
    """R − s·b(R) per sample, b(v) = +1 if v > 0 else −1."""
    n = r.shape[0]
    flat = r.reshape(n, -1)
    size = flat.shape[1]
    step = -(-size // CHUNKS)
    out = np.empty_like(flat)
    for job in prange(n * CHUNKS):
        i, c = job // CHUNKS, job % CHUNKS
        for k in range(c * step, min(size, (c + 1) * step)):
            v = flat[i, k]
            out[i, k] = v - s[i] if v > 0 else v + s[i]
    return out.reshape(r.shape)


@njit(parallel=True, cache=True, nogil=True)
def accumulate(out, y, s, levels, first):
    """out[n, o] (+)= s[n] · Σ_i y[n, i·O + o]; `first`: assign instead of add."""
    n, o = out.shape[0], out.shape[1]
    for job in prange(n * o):
        b, c = job // o, job % o
        dst = out[b, c].reshape(-1)
        for i in range(levels):
            src = y[b, i * o + c].reshape(-1)
            if first and i == 0:
                for k in range(dst.size):
                    dst[k] = s[b] * src[k]
            else:
                for k in range(dst.size):
                    dst[k] += s[b] * src[k]


@njit(cache=True, nogil=True)
def multibit_bit_conv_into(x, wp, alpha, bias, geometry, out):
    """x float32 (N, C, H, W); wp uint64 [kh, kw, words, Kw·O]; alpha [Kw, O]; bias [O]; geometry: 11 + [Ka];
    out (N, O, oh, ow) as bitconv.output_shape gives it."""
    levels_w, o = alpha.shape
    levels_x = geometry[11]
    conv_geometry = geometry[:11].copy()
    flat_alpha = alpha.copy().reshape(-1)
    zeros = np.zeros(levels_w * o, np.float32)
    residual = x
    for j in range(levels_x):
        y = bitconv.bit_conv(residual, wp, flat_alpha, zeros, conv_geometry)
        s = mean_abs(residual) if levels_x > 1 else np.ones(x.shape[0], np.float32)
        accumulate(out, y, s, levels_w, j == 0)
        if j + 1 < levels_x:
            residual = next_residual(residual, s)
    for b in range(out.shape[0]):
        for c in range(o):
            out[b, c] += bias[c]


def multibit_bit_conv(x: np.ndarray, wp: np.ndarray, alpha: np.ndarray, bias: np.ndarray,
                      geometry: np.ndarray) -> np.ndarray:
    """multibit_bit_conv_into a new array."""
    kh, kw = wp.shape[:2]
    x = np.ascontiguousarray(x)
    out = np.empty(bitconv.output_shape(x.shape[0], x.shape[2], x.shape[3], kh, kw, alpha.shape[1], geometry),
                   np.float32)
    multibit_bit_conv_into(x, wp, np.ascontiguousarray(alpha, dtype=np.float32), bias, geometry, out)
    return out
