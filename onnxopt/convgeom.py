"""Convolution geometry shared by graph code and kernels, and its int64 encoding.

PyOp attributes cannot carry lists (see shared/NOTES.md), so the custom ops take the geometry as an
int64 input tensor: [spatial_rank, stride_h, stride_w, pad_top, pad_left, pad_bottom, pad_right,
dilation_h, dilation_w, auto_pad, channels]. Conv1d is the 2-D case with height 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

AUTO_PAD = {"NOTSET": 0, "SAME_UPPER": 1, "SAME_LOWER": 2, "VALID": 3}
LENGTH = 11


@dataclass(frozen=True)
class Geometry:
    spatial_rank: int
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    dilations: tuple[int, int]
    auto_pad: int
    channels: int

    @classmethod
    def from_conv(cls, attrs: dict, spatial_rank: int, channels: int) -> "Geometry":
        def two(values, default):
            values = list(values) if values is not None else [default] * spatial_rank
            return (1, values[0]) if spatial_rank == 1 else (values[0], values[1])

        pads = attrs.get("pads")
        if pads is None:
            pads4 = (0, 0, 0, 0)
        elif spatial_rank == 1:
            pads4 = (0, pads[0], 0, pads[1])
        else:
            pads4 = (pads[0], pads[1], pads[2], pads[3])
        auto = attrs.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        return cls(spatial_rank, two(attrs.get("strides"), 1), pads4, two(attrs.get("dilations"), 1),
                   AUTO_PAD[auto], channels)

    def encode(self) -> np.ndarray:
        return np.array([self.spatial_rank, *self.strides, *self.pads, *self.dilations, self.auto_pad, self.channels],
                        dtype=np.int64)

    @classmethod
    def decode(cls, g: np.ndarray) -> "Geometry":
        g = [int(v) for v in g]
        return cls(g[0], (g[1], g[2]), (g[3], g[4], g[5], g[6]), (g[7], g[8]), g[9], g[10])

    def resolve(self, height: int, width: int, kh: int, kw: int) -> tuple[int, int, int, int]:
        """(pad_top, pad_left, out_h, out_w) for an input of this size, auto_pad applied."""
        pt, oh = resolve_axis(height, kh, self.strides[0], self.dilations[0], self.pads[0], self.pads[2], self.auto_pad)
        pl, ow = resolve_axis(width, kw, self.strides[1], self.dilations[1], self.pads[1], self.pads[3], self.auto_pad)
        return pt, pl, oh, ow


def resolve_axis(size, k, s, d, begin, end, auto_pad):
    """(pad before, output length) along one axis. Plain integer code: the kernel compiles it with numba."""
    span = (k - 1) * d + 1
    if auto_pad == 1 or auto_pad == 2:
        out = -(-size // s)
        total = max((out - 1) * s + span - size, 0)
        begin = total // 2 if auto_pad == 1 else total - total // 2
        end = total - begin
    elif auto_pad == 3:
        begin = end = 0
    return begin, (size + begin + end - span) // s + 1
