"""Binary layers chained in packed bits (Riptide's "fused glue" and "bitpack fusion").

When a BitConv's output reaches the next BitConv only through Relu and MaxPool, the next layer reads nothing but
the signs of it: Relu(y) > 0 ⇔ y > 0, and a max over a window is > 0 ⇔ one of its values is (an OR of sign bits;
a MaxPool's padding holds −∞ and adds no bit). So the first layer emits the sign bits of y = α·dot + bias,
computed with the same float32 arithmetic as the float output it replaces (bitconv._finish_signs), and the next
layer ORs them over the pool window while it places them in its padded input: no float tensor in between, and
the chain equals the unfused layers bit for bit.

Between layers the bits travel as [N, H, words(C), W] uint64 (bit c % 64 of word c // 64 is channel c's sign):
bitconv.pack_input's layout without the padding border, 64x smaller than the float tensor.
pool: int64 [kh, kw, sh, sw, dh, dw, pad top, pad left, pad bottom, pad right] (ONNX MaxPool, floor mode);
NO_POOL is the identity.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import bitconv
from .geometry import NO_POOL, POOL_LENGTH  # noqa: F401 (this module's names for the pool vector)


@njit(cache=True, nogil=True)
def pooled_shape(h, w, pool):
    """(h, w) after the pool (floor mode)."""
    oh = (h + pool[6] + pool[8] - ((pool[0] - 1) * pool[4] + 1)) // pool[2] + 1
    ow = (w + pool[7] + pool[9] - ((pool[1] - 1) * pool[5] + 1)) // pool[3] + 1
    return oh, ow


@njit(cache=True, nogil=True)
def pack_signs_into(x, out):
    """x float32 (N, C, H, W) → its sign bits (v > 0), out uint64 (N, H, words(C), W)."""
    out[:] = 0
    bitconv.pack_input(x, 0, 0, out)


@njit(parallel=True, cache=True, nogil=True)
def place_bits(bits, pool, pt, pl, h, w, out):
    """out[n, pt + r, word, pl + col] = OR of bits over pool window (r, col) of the h x w pooled grid (out's border
    zero). Taps in the pool's padding are skipped: they hold −∞ in MaxPool."""
    n, h_in, cw, w_in = bits.shape
    kh, kw, sh, sw, dh, dw, top, left = pool[0], pool[1], pool[2], pool[3], pool[4], pool[5], pool[6], pool[7]
    for job in prange(n * h):
        i, r = job // h, job % h
        for word in range(cw):
            dst = out[i, pt + r, word, pl:pl + w]
            for a in range(kh):
                src_r = r * sh - top + a * dh
                if src_r < 0 or src_r >= h_in:
                    continue
                src = bits[i, src_r, word]
                for b in range(kw):
                    for col in range(w):
                        src_c = col * sw - left + b * dw
                        if 0 <= src_c < w_in:
                            dst[col] |= src[src_c]


@njit(cache=True, nogil=True)
def packed_conv_into(bits, pool, wp, alpha, bias, geometry, out, signs):
    """BitConv on a chained input: bits [N, H, words(C), W] pooled by `pool`, then convolved as bitconv.bit_conv_into
    does; the result goes to out (float, N x O x oh x ow) or, when signs is not empty, as sign bits to
    signs [N, oh, words(O), ow] for the next layer of the chain."""
    n, h_in, cw, w_in = bits.shape
    kh, kw = wp.shape[0], wp.shape[1]
    sh, sw, dh, dw, channels = geometry[1], geometry[2], geometry[7], geometry[8], geometry[10]
    h, w = pooled_shape(h_in, w_in, pool)
    pt, pl, oh, ow = bitconv.placement(h, w, kh, kw, geometry)
    xp = np.zeros(bitconv.padded_input_shape(n, h, w, cw, pt, pl, oh, ow, kh, kw, sh, sw, dh, dw), np.uint64)
    place_bits(bits, pool, pt, pl, h, w, xp)
    bitconv.conv_packed(xp, wp, bitconv.tap_popcounts(wp), alpha, bias, channels, sh, sw, pt, pl, h, w, dh, dw, out,
                        signs)


def pack_signs(x: np.ndarray) -> np.ndarray:
    """pack_signs_into a new array."""
    n, c, h, w = x.shape
    out = np.empty((n, h, -(-c // 64), w), np.uint64)
    pack_signs_into(np.ascontiguousarray(x, dtype=np.float32), out)
    return out


def packed_conv(bits: np.ndarray, pool: np.ndarray, wp: np.ndarray, alpha: np.ndarray, bias: np.ndarray,
                geometry: np.ndarray, emit_signs: bool) -> np.ndarray:
    """packed_conv_into a new array: float (N, O, oh, ow), or its sign bits (N, oh, words(O), ow)."""
    n, h_in, _, w_in = bits.shape
    h, w = pooled_shape(h_in, w_in, pool)
    _, o, oh, ow = bitconv.output_shape(n, h, w, wp.shape[0], wp.shape[1], wp.shape[3], geometry)
    if emit_signs:
        signs = np.empty((n, oh, -(-o // 64), ow), np.uint64)
        packed_conv_into(bits, pool, wp, alpha, bias, geometry, np.empty((0, 0, 0, 0), np.float32), signs)
        return signs
    out = np.empty((n, o, oh, ow), np.float32)
    packed_conv_into(bits, pool, wp, alpha, bias, geometry, out, np.empty((0, 0, 0, 0), np.uint64))
    return out
