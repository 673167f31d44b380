"""Float emulation of the binarized convolution: the meaning of BinaryConv and the oracle for BitConv.

out[n, o] = α[o] · Σ b(x)·b(w) + bias[o], b(v) = +1 if v > 0 else −1, padded taps contribute 0.
The ±1 sums are integers computed in float32 (exact below 2²⁴ terms), then scaled once, in the same
order as the bit-packed kernel, so the two agree bit for bit.
"""
from __future__ import annotations

import numpy as np

from .geometry import Geometry


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


def residual_planes(v: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Residual binarization of v over each slice along axis 0 (an output channel of a weight, a sample of an
    activation): R1 = v; s_i = mean |R_i|, B_i = b(R_i), R_(i+1) = R_i − s_i·B_i. Returns (B [levels, *v.shape],
    s [levels, len(v)]), in float32 as the kernels compute them."""
    r = v.astype(np.float32, copy=True)
    planes, scales = [], []
    axes = tuple(range(1, v.ndim))
    for _ in range(levels):
        s = np.abs(r).mean(axis=axes, dtype=np.float64).astype(np.float32)  # one rounding, as the kernel
        b = sign(r)
        planes.append(b)
        scales.append(s)
        r = r - s.reshape((-1,) + (1,) * len(axes)) * b
    return np.stack(planes), np.stack(scales)


def multibit_weight(w: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Σ_i alpha[i, o] · B_i[o]: the weight's bit planes (from the residual procedure on W) at the stored scales
    (initially the residual means; refit and training move them). Kw = 1: α·b(W), BinaryConv's weight."""
    planes, _ = residual_planes(w, len(alpha))
    return np.einsum("lo,lo...->o...", alpha.astype(np.float64), planes.astype(np.float64))


def multibit_activation(x: np.ndarray, levels: int) -> np.ndarray:
    """Ka = 1: b(X) with no scale (BinaryConv's input); Ka > 1: Σ_i s_i·B_i, the scales per sample."""
    if levels == 1:
        return sign(x).astype(np.float64)
    planes, scales = residual_planes(x, levels)
    return np.einsum("ln,ln...->n...", scales.astype(np.float64), planes.astype(np.float64))


def multibit_conv(x: np.ndarray, w: np.ndarray, alpha: np.ndarray, bias: np.ndarray, geometry: np.ndarray):
    """MultibitConv: Conv(approx(X), approx(W)) + bias with zero padding, computed in float64 from the
    approximations themselves (the oracle for the bit-serial kernel)."""
    from .geometry import im2col

    g = Geometry.decode(geometry[:11])
    xa, wa = multibit_activation(x, int(geometry[11])), multibit_weight(w, alpha)
    x4 = xa[:, :, None, :] if g.spatial_rank == 1 else xa
    w4 = wa[:, :, None, :] if g.spatial_rank == 1 else wa
    n, o = len(x4), len(w4)
    _, _, oh, ow = g.resolve(x4.shape[2], x4.shape[3], w4.shape[2], w4.shape[3])
    cols = im2col(x4, w4.shape[2:], g)
    out = (cols @ w4.reshape(o, -1).T + bias.astype(np.float64)).reshape(n, oh, ow, o).transpose(0, 3, 1, 2)
    out = np.ascontiguousarray(out, dtype=np.float32)
    return out[:, :, 0, :] if g.spatial_rank == 1 else out
