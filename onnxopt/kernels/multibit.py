"""The lowered multi-bit convolution, bit-serial on the 1-bit kernel (kernels/bitconv.py).

Conv(Σ_j s_j·B_j(X), Σ_i α_i·B_i(W)) = Σ_j s_j · Σ_i α_i ⊙ Conv(B_j, B_i): the Kw weight planes are packed side
by side as Kw·O output channels, so one pass of the 1-bit kernel per activation level computes every weight
level at once with the kernel's own tiling and packing (Ka passes in all, each Kw·O channels wide); the epilogue
sums the Kw column blocks and scales each sample by its s_j. The 1-bit kernel binarizes its float input itself,
so each pass is given the residual R_j, whose signs are B_j. Zero padding stays exact (the kernel's).
"""
from __future__ import annotations

import numpy as np

from . import bitconv


def multibit_bit_conv(x: np.ndarray, wp: np.ndarray, alpha: np.ndarray, bias: np.ndarray,
                      geometry: np.ndarray) -> np.ndarray:
    """x float32 (N, C, H, W); wp uint64 [kh, kw, words, Kw·O]; alpha [Kw, O]; bias [O]; geometry: 11 + [Ka]."""
    levels_w, o = alpha.shape
    levels_x = int(geometry[11])
    conv_geometry = np.ascontiguousarray(geometry[:11])
    flat_alpha = np.ascontiguousarray(alpha.reshape(-1), dtype=np.float32)
    zeros = np.zeros(levels_w * o, np.float32)
    residual, out = x, None
    for j in range(levels_x):
        y = bitconv.bit_conv(residual, wp, flat_alpha, zeros, conv_geometry)
        y = y.reshape(len(x), levels_w, o, *y.shape[2:]).sum(axis=1) if levels_w > 1 else y
        if levels_x > 1:
            s = np.abs(residual).mean(axis=(1, 2, 3), dtype=np.float32).astype(np.float32).reshape(-1, 1, 1, 1)
            y *= s
            if j + 1 < levels_x:
                residual = residual - s * np.where(residual > 0, np.float32(1), np.float32(-1))
        out = y if out is None else out + y
    out += bias.reshape(1, -1, 1, 1)
    return out
