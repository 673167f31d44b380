"""Weight bit packing (numpy only, so graph code can pack without importing numba)."""
from __future__ import annotations

import numpy as np

WORD = 64


def words(channels: int) -> int:
    return (channels + WORD - 1) // WORD


def pack_weights(w: np.ndarray) -> np.ndarray:
    """float (O, C, KH, KW) → uint64 (KH, KW, words(C), O), bit c%64 of word c//64 = (w > 0)."""
    o, c, kh, kw = w.shape
    bits = np.zeros((kh, kw, o, words(c) * WORD), np.uint8)
    bits[..., :c] = (w > 0).transpose(2, 3, 0, 1)
    packed = np.packbits(bits, axis=-1, bitorder="little").view("<u8")  # (kh, kw, o, words)
    return np.ascontiguousarray(packed.transpose(0, 1, 3, 2)).astype(np.uint64)
