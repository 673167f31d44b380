"""Float emulation of the binarized convolution: the meaning of BinaryConv and the oracle for BitConv.

out[n, o] = α[o] · Σ b(x)·b(w) + bias[o], b(v) = +1 if v > 0 else −1, padded taps contribute 0.
The ±1 sums are integers computed in float32 (exact below 2²⁴ terms), then scaled once, in the same
order as the bit-packed kernel, so the two agree bit for bit.
"""
from __future__ import annotations

import numpy as np

from ..convgeom import Geometry


def sign(v: np.ndarray) -> np.ndarray:
    return np.where(v > 0, np.float32(1), np.float32(-1))


def binary_conv(x: np.ndarray, w: np.ndarray, alpha: np.ndarray, bias: np.ndarray, geometry: np.ndarray) -> np.ndarray:
    g = Geometry.decode(geometry)
    x4 = x[:, :, None, :] if g.spatial_rank == 1 else x
    w4 = w[:, :, None, :] if g.spatial_rank == 1 else w
    n, c, h, wd = x4.shape
    o, _, kh, kw = w4.shape
    pt, pl, oh, ow = g.resolve(h, wd, kh, kw)
    sh, sw = g.strides
    dh, dw = g.dilations
    # zero padding after binarization: padded taps contribute 0, not ±1
    span_h, span_w = (oh - 1) * sh + (kh - 1) * dh + 1, (ow - 1) * sw + (kw - 1) * dw + 1
    xp = np.zeros((n, h + pt + max(span_h - h - pt, 0), wd + pl + max(span_w - wd - pl, 0), c), np.float32)
    xp[:, pt:pt + h, pl:pl + wd, :] = sign(x4).transpose(0, 2, 3, 1)
    wb = sign(w4)
    sums = np.zeros((n, oh, ow, o), np.float32)
    for i in range(kh):
        for j in range(kw):
            taps = xp[:, i * dh: i * dh + (oh - 1) * sh + 1: sh, j * dw: j * dw + (ow - 1) * sw + 1: sw, :]
            sums += taps @ wb[:, :, i, j].T
    out = (sums * alpha.astype(np.float32) + bias.astype(np.float32)).transpose(0, 3, 1, 2)
    out = np.ascontiguousarray(out, dtype=np.float32)
    return out[:, :, 0, :] if g.spatial_rank == 1 else out
