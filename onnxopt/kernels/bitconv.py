"""Bit-packed binary convolution (XNOR + popcount), JIT-compiled by numba and cached on disk.

With bit = (v > 0), b(v) = 2·bit − 1, and a word of 64 channels: Σ b(x)·b(w) = C − 2·popcount(x ⊕ w)
when the unused tail bits are zero in both words. Padded taps are skipped, so they contribute 0.

Layouts: packed input [n, h, w, channel_word]; packed weights [kh, kw, channel_word, out_channel],
output channels innermost so the popcount loop runs over contiguous words and vectorizes.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic


@intrinsic
def popcount(typingctx, x):
    """LLVM's ctpop on a uint64 (numba has no popcount builtin)."""
    if x != types.uint64:
        return None

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return types.uint64(types.uint64), codegen


@njit(parallel=True, cache=True, nogil=True)
def pack_input(x, out):
    """float (N, C, H, W) → uint64 (N, H, W, words(C)); out must be zeroed."""
    n, c, h, w = x.shape
    for job in prange(n * h):
        i = job // h
        r = job - i * h
        for ch in range(c):
            word = ch >> 6
            bit = np.uint64(1) << np.uint64(ch & 63)
            for col in range(w):
                if x[i, ch, r, col] > 0:
                    out[i, r, col, word] |= bit


@njit(parallel=True, cache=True, nogil=True)
def conv_packed(xp, wp, alpha, bias, channels, sh, sw, pt, pl, dh, dw, out):
    """out (N, O, OH, OW) = α·(valid_taps·C − 2·Σ popcount(x ⊕ w)) + bias."""
    n, h, w, cw = xp.shape
    kh, kw, _, o = wp.shape
    _, _, oh, ow = out.shape
    for job in prange(n * oh):
        i = job // oh
        r = job - i * oh
        acc = np.zeros(o, np.int64)
        for col in range(ow):
            acc[:] = 0
            taps = 0
            for a in range(kh):
                ih = r * sh - pt + a * dh
                if ih < 0 or ih >= h:
                    continue
                for b in range(kw):
                    iw = col * sw - pl + b * dw
                    if iw < 0 or iw >= w:
                        continue
                    taps += 1
                    for c in range(cw):
                        xw = xp[i, ih, iw, c]
                        for k in range(o):
                            acc[k] += popcount(xw ^ wp[a, b, c, k])
            base = taps * channels
            for k in range(o):
                total = np.float32(base - 2 * acc[k])
                scaled = total * alpha[k]
                out[i, k, r, col] = scaled + bias[k]


def bit_conv(x: np.ndarray, wp: np.ndarray, alpha: np.ndarray, bias: np.ndarray, pt: int, pl: int, oh: int,
             ow: int, channels: int, strides, dilations) -> np.ndarray:
    """Binarize and pack x, then convolve with packed weights; x is (N, C, H, W) float32."""
    n = x.shape[0]
    xp = np.zeros((n, x.shape[2], x.shape[3], wp.shape[2]), np.uint64)
    pack_input(x, xp)
    out = np.empty((n, wp.shape[3], oh, ow), np.float32)
    conv_packed(xp, wp, alpha, bias, channels, strides[0], strides[1], pt, pl, dilations[0], dilations[1], out)
    return out
