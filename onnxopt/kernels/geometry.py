"""Convolution geometry shared by graph code and kernels, and its int64 encoding.

PyOp attributes cannot carry lists (values travel as strings), so the custom ops take the geometry as an
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

    def conv_attributes(self) -> dict:
        """The ONNX Conv attributes of this geometry (for the standard-ops forms of the custom ops)."""
        one_d = self.spatial_rank == 1
        attrs = {"strides": [self.strides[1]] if one_d else list(self.strides),
                 "dilations": [self.dilations[1]] if one_d else list(self.dilations)}
        if self.auto_pad:
            attrs["auto_pad"] = {code: name for name, code in AUTO_PAD.items()}[self.auto_pad]
        else:
            top, left, bottom, right = self.pads
            attrs["pads"] = [left, right] if one_d else [top, left, bottom, right]
        return attrs

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


def padded_extent(size, k, s, d, begin, out, lanes):
    """Length along one axis of the kernel's padded input: every tap of `out` outputs rounded up to whole
    `lanes` (a tile's pixels read past the row end). Plain integer code, compiled by numba in the kernel."""
    out_lanes = -(-out // lanes) * lanes
    return max(begin + size, (out_lanes - 1) * s + (k - 1) * d + 1)


# The most a kernel may allocate for its padded packed input (per activation level). Geometry comes from files:
# stride 4096 with pads 65536 on a 1x1 input asks for 34 GB, and an allocation failing inside a C-called kernel
# cannot raise, so the size is checked before the call. 2 GiB holds a batch of 64 images of 1024x1024 x 256
# channels.
MAX_WORK_BYTES = 1 << 31
TILE_PIXELS = 8  # kernels/simd.py's LANES: the kernel writes a row in tiles of this many pixels


def work_bytes(shape: tuple[int, int, int, int], kernel: tuple[int, int], g: "Geometry", levels: int = 1) -> float:
    """Bytes of the padded packed input(s) a kernel allocates for an (n, c, h, w) input; kernels/bitconv.py's
    njit work_bytes and kernels/native/binary.c compute the same."""
    n, c, h, w = shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, g.strides, g.dilations
    pt, pl, oh, ow = g.resolve(h, w, kh, kw)
    rows = padded_extent(h, kh, sh, dh, pt, max(oh, 1), 1)
    cols = padded_extent(w, kw, sw, dw, pl, max(ow, 1), TILE_PIXELS)
    return float(levels) * n * rows * (-(-c // 64)) * cols * 8


# A MaxPool window between chained binary layers (kernels/chain.py): int64 [kh, kw, sh, sw, dh, dw, pad top, pad left,
# pad bottom, pad right]; NO_POOL is the identity. Here, beside the conv geometry, so graph code need not load numba.
NO_POOL = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0, 0], np.int64)
POOL_LENGTH = 10

# Bounds for geometry read from a file: far beyond any real conv, small enough that no index overflows
MAX_STEP = 1 << 12  # strides and dilations
MAX_PAD = 1 << 16


def geometry_problem(g: np.ndarray) -> str | None:
    """Why an int64 geometry vector cannot be given to a kernel, or None. Checked wherever a geometry comes
    from outside this package's own writer (a file, a training hook)."""
    g = np.asarray(g)
    if g.dtype != np.int64 or g.shape != (LENGTH,):
        return f"geometry must be {LENGTH} int64 values, got {g.dtype} of shape {list(g.shape)}"
    rank, sh, sw, pt, pl, pb, pr, dh, dw, auto_pad, channels = (int(v) for v in g)
    if rank not in (1, 2):
        return f"geometry spatial rank {rank}: only 1 and 2 are supported"
    if not (1 <= sh <= MAX_STEP and 1 <= sw <= MAX_STEP):
        return f"strides ({sh}, {sw}) out of range 1..{MAX_STEP}"
    if not (1 <= dh <= MAX_STEP and 1 <= dw <= MAX_STEP):
        return f"dilations ({dh}, {dw}) out of range 1..{MAX_STEP}"
    if not all(0 <= p <= MAX_PAD for p in (pt, pl, pb, pr)):
        return f"pads ({pt}, {pl}, {pb}, {pr}) out of range 0..{MAX_PAD}"
    if auto_pad not in AUTO_PAD.values():
        return f"auto_pad code {auto_pad} is not one of {sorted(AUTO_PAD.values())}"
    if rank == 1 and (sh, dh, pt, pb) != (1, 1, 0, 0):
        return "a 1-D geometry must have height stride, dilation and pads of (1, 1, 0, 0)"
    if channels < 1:
        return f"geometry channels {channels} must be >= 1"
    return None


def im2col(x: np.ndarray, kernel: tuple[int, int], g: "Geometry") -> np.ndarray:
    """The patches a conv of this geometry multiplies, (N·out_h·out_w, C·kh·kw) with columns ordered (c, i, j)
    as in W.reshape(O, -1): data-aware factoring of convs needs their Gram matrix. 2-D input (N, C, H, W);
    padded taps are zeros."""
    n, c, h, w = x.shape
    kh, kw = kernel
    pt, pl, oh, ow = g.resolve(h, w, kh, kw)
    (sh, sw), (dh, dw) = g.strides, g.dilations
    span_h, span_w = (oh - 1) * sh + (kh - 1) * dh + 1, (ow - 1) * sw + (kw - 1) * dw + 1
    xp = np.zeros((n, c, max(h + pt, span_h), max(w + pl, span_w)), x.dtype)
    xp[:, :, pt:pt + h, pl:pl + w] = x
    cols = np.empty((n, oh, ow, c, kh, kw), x.dtype)
    for i in range(kh):
        for j in range(kw):
            taps = xp[:, :, i * dh: i * dh + (oh - 1) * sh + 1: sh, j * dw: j * dw + (ow - 1) * sw + 1: sw]
            cols[..., i, j] = taps.transpose(0, 2, 3, 1)
    return cols.reshape(n * oh * ow, c * kh * kw)
