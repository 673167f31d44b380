"""Bit-packed binary convolution (XNOR + popcount), JIT-compiled by numba and cached on disk.

With bit = (v > 0), b(v) = 2·bit − 1, and a word of 64 channels: Σ b(x)·b(w) = C − 2·popcount(x ⊕ w)
when the unused tail bits are zero in both words.

Layouts:
- packed input [n, row, channel_word, col] with a zero border for the padding (and slack on the right
  for the last vector), so eight neighbouring output pixels' words load as one vector and the inner
  loop has no bounds checks;
- packed weights [kh, kw, channel_word, out_channel] (`packing.pack_weights`), one word broadcast to
  all eight pixel lanes.
A padded tap reads a zero word and adds popcount(w) where the true contribution is 0; border pixels
subtract that back (`padding_terms`), so padding stays exact zero.

The inner loop computes a tile of 8 output pixels (the vector lanes, `simd.vec8`) × 8 output channels (4
with AVX2 only), one accumulator register each: per tap and 64 input channels, one input-vector load and
one broadcast weight word per channel feed the xor/popcount/add steps. Pixels sit in the lanes so the
epilogue converts and writes whole output rows.
"""
from __future__ import annotations

import numpy as np

from . import ensure_numba_cache

ensure_numba_cache()  # before any numba function is decorated (multibit.py and chain.py import this module first)

from numba import njit, prange  # noqa: E402

from . import drop_stale_numba_caches, simd, start_thread_pool  # noqa: E402
from . import geometry as convgeom  # noqa: E402
from .simd import popcount  # noqa: E402

drop_stale_numba_caches()  # before any function of this module or its callers loads from numba's cache
start_thread_pool()  # before a cached kernel runs (a segfault otherwise: kernels.start_thread_pool)


def _vector_popcount() -> bool:
    """Whether numba's target CPU has AVX-512 VPOPCNTQ (NUMBA_CPU_FEATURES overrides the host's features)."""
    from llvmlite import binding
    from numba.core import config

    return "+avx512vpopcntdq" in (config.CPU_FEATURES or binding.get_host_cpu_features().flatten())


def _wide_tile() -> bool:
    """The 8-channel tile with one popcount per 64-bit lane (AVX-512 VPOPCNTQ), or the 4-channel one with byte
    counts. ONNXOPT_KERNEL_TILE=wide|narrow picks one, so that tests run the other tile's code on any x86 CPU
    (LLVM emulates the vector popcount without AVX-512); numba's cache does not know this setting, so a process
    that changes it needs its own NUMBA_CACHE_DIR."""
    import os

    forced = os.environ.get("ONNXOPT_KERNEL_TILE", "").lower()
    return forced == "wide" if forced in ("wide", "narrow") else _vector_popcount()


# 8 accumulators fill 8 of AVX-512's 32 zmm registers; with AVX2 each takes 2 of 16 ymm registers and the
# byte-shuffle popcount needs several more, so 4 accumulators there (8 spilled: measured 2x slower)
WIDE = _wide_tile()
TILE_CHANNELS = 8 if WIDE else 4
TILE_PIXELS = simd.LANES
padded_extent = njit(cache=True, nogil=True)(convgeom.padded_extent)
GROUP_CHANNELS = 64  # output channels per parallel job (its input rows stay in L1); one word of emitted signs


@njit(cache=True, nogil=True)
def padded_input_shape(n, h, w, cw, pt, pl, oh, ow, kh, kw, sh, sw, dh, dw):
    """Packed input buffer that covers every tap of every pixel lane, including the last tile's
    lanes past the row end (they read zeros and are never written out)."""
    return (n, padded_extent(h, kh, sh, dh, pt, oh, 1), cw, padded_extent(w, kw, sw, dw, pl, ow, TILE_PIXELS))


@njit(parallel=True, cache=True, nogil=True)
def pack_input(x, pt, pl, out):
    """float (N, C, H, W) → sign bits in uint64 (N, rows, words(C), cols) at offset (pt, pl); out's
    border must be zero. Bits are built 64 channels at a time with compares vectorized along the row."""
    n, c, h, w = x.shape
    words = out.shape[2]
    for job in prange(n * h):
        i = job // h
        r = job - i * h
        for word in range(words):
            row = out[i, pt + r, word, pl:pl + w]
            for b in range(min(64, c - word * 64)):
                ch = word * 64 + b
                shift = np.uint64(b)
                for col in range(w):
                    row[col] |= np.uint64(x[i, ch, r, col] > 0) << shift


@njit(cache=True, nogil=True)
def tap_popcounts(wp):
    """Per tap and output channel, the number of set weight bits: what a zero (padded) input word adds."""
    kh, kw, cw, o = wp.shape
    counts = np.zeros((kh, kw, o), np.int64)
    for a in range(kh):
        for b in range(kw):
            for c in range(cw):
                for k in range(o):
                    counts[a, b, k] += popcount(wp[a, b, c, k])
    return counts


@njit(cache=True, nogil=True)
def tap_offsets(kh, kw, cw, dh, dw, cols):
    """Offset of each (tap, channel word) in the flattened packed input, from the pixel's origin."""
    offsets = np.empty(kh * kw * cw, np.int64)
    t = 0
    for a in range(kh):
        for b in range(kw):
            for c in range(cw):
                offsets[t] = (a * dh * cw + c) * cols + b * dw
                t += 1
    return offsets


@njit(cache=True, nogil=True)
def _padded_taps(start, k, d, size, padded):
    """padded[a] = 1 where tap a of a window starting at `start` falls outside [0, size). A byte per tap, not a
    bit mask in one integer: a kernel may have any number of taps (an int64 mask wrapped past 64 taps)."""
    for a in range(k):
        padded[a] = not 0 <= start + a * d < size


@njit(cache=True, nogil=True)
def _pattern_ids(k, d, stride, pad, size, out_size):
    """Per output position along one axis, the index of its padded-tap pattern among the distinct ones
    (0 = no padded tap), and those patterns (patterns[q, a] = 1: tap a padded). A 3×3 pad-1 conv has three:
    none, first, last."""
    ids = np.empty(out_size, np.int64)
    patterns = np.zeros((out_size + 1, k), np.uint8)  # patterns[0]: the interior, no tap padded
    padded = np.empty(k, np.uint8)
    count = 1
    for p in range(out_size):
        _padded_taps(p * stride - pad, k, d, size, padded)
        found = -1
        for q in range(count):
            same = True
            for a in range(k):  # a plain loop: np.array_equal costs seconds of compile time
                if patterns[q, a] != padded[a]:
                    same = False
                    break
            if same:
                found = q
                break
        if found < 0:
            patterns[count] = padded
            found = count
            count += 1
        ids[p] = found
    return ids, patterns[:count]


@njit(cache=True, nogil=True)
def _count(padded):
    n = 0
    for v in padded:
        n += v
    return n


@njit(cache=True, nogil=True)
def padding_terms(channels, taps_pop, sh, sw, pt, pl, dh, dw, h, w, oh, ow):
    """What padding changes, computed once per call rather than per image and channel tile:
    base[r, col] = valid taps × channels (the ±1 count a pixel's sum starts from); the pixels with padded
    taps, row r's in cols[starts[r]:starts[r + 1]], each with a pattern index into excess, where
    excess[p, k] = Σ over pattern p's padded taps of popcount(w): what the zero words read there added
    to the popcount sum. Pixels share the few row × column patterns, so excess stays small."""
    kh, kw, o = taps_pop.shape
    row_ids, row_masks = _pattern_ids(kh, dh, sh, pt, h, oh)
    col_ids, col_masks = _pattern_ids(kw, dw, sw, pl, w, ow)
    n_cols = col_masks.shape[0]
    excess = np.zeros((row_masks.shape[0] * n_cols, o), np.int32)
    for rp in range(row_masks.shape[0]):
        for cp in range(n_cols):
            for a in range(kh):
                for b in range(kw):
                    if row_masks[rp, a] or col_masks[cp, b]:
                        for k in range(o):
                            excess[rp * n_cols + cp, k] += taps_pop[a, b, k]
    base = np.empty((oh, ow), np.int32)
    starts = np.zeros(oh + 1, np.int64)
    cols = np.empty(oh * ow, np.int64)
    patterns = np.empty(oh * ow, np.int64)
    count = 0
    for r in range(oh):
        rows_valid = kh - _count(row_masks[row_ids[r]])
        for col in range(ow):
            cols_valid = kw - _count(col_masks[col_ids[col]])
            base[r, col] = rows_valid * cols_valid * channels
            if row_ids[r] or col_ids[col]:
                cols[count] = col
                patterns[count] = row_ids[r] * n_cols + col_ids[col]
                count += 1
        starts[r + 1] = count
    return base, starts, cols[:count], patterns[:count], excess


@njit(cache=True, nogil=True, inline="always")
def remove_padding(sums, k0, k1, first, r, starts, cols, patterns, excess):
    """Take out of one output row's popcount sums (sums[k − k0, col]) what padded taps added; the weight's channels
    are excess columns first + k (first > 0: a multi-bit weight plane)."""
    for j in range(starts[r], starts[r + 1]):
        col, pattern = cols[j], patterns[j]
        for k in range(k0, k1):
            sums[k - k0, col] -= excess[pattern, first + k]


@njit(cache=True, nogil=True, inline="always")
def _finish_row(sums, k0, k1, i, r, base, alpha, bias, out):
    """Scale one output row's popcount sums (sums[k − k0, col], padding removed) into out: α·(base − 2·sum) + bias."""
    ow = out.shape[3]
    two = np.float32(2)
    for k in range(k0, k1):
        scale, shift = alpha[k], bias[k]
        for col in range(ow):
            # integers below 2²⁴ are exact in float32, so this is the exact ±1 sum, as in the reference
            total = np.float32(base[r, col]) - two * np.float32(sums[k - k0, col])
            out[i, k, r, col] = total * scale + shift


@njit(cache=True, nogil=True, inline="always")
def _finish_signs(sums, k0, k1, i, r, base, alpha, bias, signs):
    """The sign bits of what _finish_row would write, (y > 0) with the same float32 arithmetic, packed as the
    next layer reads them: signs[i, r, word, col] holds channels k0..k1 (k0 = 64·word)."""
    ow = signs.shape[3]
    two = np.float32(2)
    word = signs[i, r, k0 // 64]
    word[:] = 0
    for k in range(k0, k1):
        scale, shift, bit = alpha[k], bias[k], np.uint64(k - k0)
        for col in range(ow):
            total = np.float32(base[r, col]) - two * np.float32(sums[k - k0, col])
            word[col] |= np.uint64(total * scale + shift > 0) << bit


@njit(cache=True, nogil=True, inline="always")
def rows_per_job(ow):
    """Rows of at most 4 pixels go two to a tile (a 4x4 map keeps all 8 lanes busy instead of 4)."""
    return 2 if 2 * ow <= TILE_PIXELS else 1


@njit(cache=True, nogil=True, inline="always")
def job_rows(job, groups, row_jobs, per_job, oh):
    """(channel group, sample, row, second row) of a parallel job; the second row is the row itself when the job has
    one, and an odd last row is computed twice, written once."""
    r = (job // groups) % row_jobs * per_job
    return job % groups, job // (row_jobs * groups), r, min(r + 1, oh - 1) if per_job == 2 else r


@njit(cache=True, nogil=True, inline="always")
def _finish(sums, k0, k1, i, r, starts, cols, patterns, excess, base, alpha, bias, out, signs):
    """One output row's sums (sums[k − k0, col]), padding removed, into out, or into signs when that is not empty."""
    remove_padding(sums, k0, k1, 0, r, starts, cols, patterns, excess)
    if signs.shape[0] > 0:
        _finish_signs(sums, k0, k1, i, r, base, alpha, bias, signs)
    else:
        _finish_row(sums, k0, k1, i, r, base, alpha, bias, out)


@njit(cache=True, nogil=True, inline="always")
def _pixel_lanes(xflat, at, next_row, sw):
    """The input words of one tap and channel word for the tile's 8 output pixels: 8 neighbours in a row
    (next_row < 0), or 4 in a row and 4 in the row next_row words further on (short rows)."""
    if next_row < 0:
        return simd.load(xflat, at) if sw == 1 else simd.load_strided(xflat, at, at + 4 * sw, sw)
    return simd.load_halves(xflat, at, at + next_row) if sw == 1 else \
        simd.load_strided(xflat, at, at + next_row, sw)


@njit(cache=True, nogil=True, inline="always")
def channel_tiles(xflat, wflat, offsets, row_origin, next_row, sw, o, k_start, k_stop, last, tiles, flat):
    """Popcount sums of one output row for output channels k_start..k_stop (columns of wflat, o of them in all,
    `last` the highest one this tile may read) into flat = sums[k − k_start, col], row stride tiles·8. With
    next_row ≥ 0 (rows of at most 4 pixels, one tile), lanes 4-7 hold the row whose input starts next_row words
    after this one's: sums[k − k_start, 4 + col]."""
    steps = offsets.shape[0]
    stride = tiles * TILE_PIXELS
    for k0 in range(k_start, k_stop, TILE_CHANNELS):
        # a short last tile repeats the last channel, so the inner loop has no branch
        k1, k2, k3 = min(k0 + 1, last), min(k0 + 2, last), min(k0 + 3, last)
        k4, k5, k6, k7 = min(k0 + 4, last), min(k0 + 5, last), min(k0 + 6, last), min(k0 + 7, last)
        row0 = (k0 - k_start) * stride
        # WIDE is a compile-time constant: numba drops the a4–a7 code when it is False
        for tile in range(tiles):
            col0 = tile * TILE_PIXELS
            origin = row_origin + col0 * sw
            a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = simd.zeros()
            if WIDE:  # vector popcount: one count per 64-bit lane
                for t in range(steps):
                    x = _pixel_lanes(xflat, origin + offsets[t], next_row, sw)
                    wt = t * o
                    a0 = simd.xor_popcount_add(a0, simd.word(wflat, wt + k0), x)
                    a1 = simd.xor_popcount_add(a1, simd.word(wflat, wt + k1), x)
                    a2 = simd.xor_popcount_add(a2, simd.word(wflat, wt + k2), x)
                    a3 = simd.xor_popcount_add(a3, simd.word(wflat, wt + k3), x)
                    a4 = simd.xor_popcount_add(a4, simd.word(wflat, wt + k4), x)
                    a5 = simd.xor_popcount_add(a5, simd.word(wflat, wt + k5), x)
                    a6 = simd.xor_popcount_add(a6, simd.word(wflat, wt + k6), x)
                    a7 = simd.xor_popcount_add(a7, simd.word(wflat, wt + k7), x)
            else:  # byte counts (table lookups), summed per lane once every BYTE_STEPS steps
                for t0 in range(0, steps, simd.BYTE_STEPS):
                    b0 = b1 = b2 = b3 = simd.zeros()
                    for t in range(t0, min(t0 + simd.BYTE_STEPS, steps)):
                        x = _pixel_lanes(xflat, origin + offsets[t], next_row, sw)
                        wt = t * o
                        b0 = simd.xor_popcount_add_bytes(b0, simd.word(wflat, wt + k0), x)
                        b1 = simd.xor_popcount_add_bytes(b1, simd.word(wflat, wt + k1), x)
                        b2 = simd.xor_popcount_add_bytes(b2, simd.word(wflat, wt + k2), x)
                        b3 = simd.xor_popcount_add_bytes(b3, simd.word(wflat, wt + k3), x)
                    a0, a1 = simd.add_byte_sums(a0, b0), simd.add_byte_sums(a1, b1)
                    a2, a3 = simd.add_byte_sums(a2, b2), simd.add_byte_sums(a3, b3)
            simd.store(flat, row0 + col0, a0)
            simd.store(flat, row0 + stride + col0, a1)
            simd.store(flat, row0 + 2 * stride + col0, a2)
            simd.store(flat, row0 + 3 * stride + col0, a3)
            if WIDE:
                simd.store(flat, row0 + 4 * stride + col0, a4)
                simd.store(flat, row0 + 5 * stride + col0, a5)
                simd.store(flat, row0 + 6 * stride + col0, a6)
                simd.store(flat, row0 + 7 * stride + col0, a7)


@njit(parallel=True, cache=True, nogil=True)
def conv_packed(xp, wp, taps_pop, alpha, bias, channels, sh, sw, pt, pl, h, w, dh, dw, out, signs):
    """out (N, O, OH, OW) = α·(valid_taps·C − 2·Σ popcount(x ⊕ w)) + bias; xp from `pack_input`. When signs is not
    empty, its sign bits go there instead, [N, OH, words(O), OW] (a chained layer's input, kernels/chain.py)."""
    n, rows, cw, cols = xp.shape
    kh, kw, _, o = wp.shape
    emit_signs = signs.shape[0] > 0
    oh, ow = (signs.shape[1], signs.shape[3]) if emit_signs else (out.shape[2], out.shape[3])
    xflat = xp.reshape(-1)
    wflat = wp.reshape(-1)  # [(a·kw + b)·cw + c]·o + k
    offsets = tap_offsets(kh, kw, cw, dh, dw, cols)
    groups = (o + GROUP_CHANNELS - 1) // GROUP_CHANNELS
    tiles = (ow + TILE_PIXELS - 1) // TILE_PIXELS
    base, starts, border_cols, patterns, excess = padding_terms(channels, taps_pop, sh, sw, pt, pl, dh, dw, h, w,
                                                                 oh, ow)
    per_job = rows_per_job(ow)
    row_jobs = (oh + per_job - 1) // per_job
    for job in prange(n * row_jobs * groups):
        g, i, r, r2 = job_rows(job, groups, row_jobs, per_job, oh)
        g0, g1 = g * GROUP_CHANNELS, min(o, (g + 1) * GROUP_CHANNELS)
        row_origin = (i * rows + r * sh) * cw * cols
        next_row = (r2 - r) * sh * cw * cols if per_job == 2 else -1
        sums = np.empty((GROUP_CHANNELS, tiles * TILE_PIXELS), np.int32)  # the job's rows, scaled out at the end
        channel_tiles(xflat, wflat, offsets, row_origin, next_row, sw, o, g0, g1, o - 1, tiles, sums.reshape(-1))
        _finish(sums, g0, g1, i, r, starts, border_cols, patterns, excess, base, alpha, bias, out, signs)
        if r2 != r:
            _finish(sums[:, TILE_PIXELS // 2:], g0, g1, i, r2, starts, border_cols, patterns, excess, base, alpha,
                    bias, out, signs)


resolve_axis = njit(cache=True, nogil=True)(convgeom.resolve_axis)


@njit(cache=True, nogil=True)
def placement(h, w, kh, kw, geometry):
    """(top padding, left padding, oh, ow) of a kh x kw kernel over an h x w input; geometry is the int64 encoding
    of `convgeom.Geometry` (strides at 1-2, pads 3-6, dilations 7-8, auto_pad 9, channels 10)."""
    pt, oh = resolve_axis(h, kh, geometry[1], geometry[7], geometry[3], geometry[5], geometry[9])
    pl, ow = resolve_axis(w, kw, geometry[2], geometry[8], geometry[4], geometry[6], geometry[9])
    return pt, pl, oh, ow


@njit(cache=True, nogil=True)
def work_bytes(n, h, w, channels, kh, kw, geometry, levels=1):
    """Bytes of the padded packed input buffer(s) the kernel allocates for an (n, channels, h, w) input (the other
    buffers are at most the output's size); checked against convgeom.MAX_WORK_BYTES before a call."""
    pt, pl, oh, ow = placement(h, w, kh, kw, geometry)
    _, rows, cw, cols = padded_input_shape(n, h, w, (channels + 63) // 64, pt, pl, max(oh, 1), max(ow, 1), kh, kw,
                                           geometry[1], geometry[2], geometry[7], geometry[8])
    return float(levels) * n * rows * cw * cols * 8  # float: the product of four int64 may overflow


@njit(cache=True, nogil=True)
def output_shape(n, h, w, kh, kw, o, geometry):
    """(n, O, oh, ow) of bit_conv for an input (n, C, h, w) and a kh x kw kernel with O outputs; oh or ow < 1
    when the input is smaller than the kernel's span."""
    _, _, oh, ow = placement(h, w, kh, kw, geometry)
    return n, o, oh, ow


@njit(cache=True, nogil=True)
def bit_conv_into(x, wp, alpha, bias, geometry, out):
    """Binarize and pack x (N, C, H, W) float32, then convolve with packed weights into `out` (output_shape)."""
    n, _, h, w = x.shape
    kh, kw, cw, _ = wp.shape
    sh, sw, dh, dw, channels = geometry[1], geometry[2], geometry[7], geometry[8], geometry[10]
    pt, pl, oh, ow = placement(h, w, kh, kw, geometry)
    xp = np.zeros(padded_input_shape(n, h, w, cw, pt, pl, oh, ow, kh, kw, sh, sw, dh, dw), np.uint64)
    pack_input(x, pt, pl, xp)
    conv_packed(xp, wp, tap_popcounts(wp), alpha, bias, channels, sh, sw, pt, pl, h, w, dh, dw, out,
                np.empty((0, 0, 0, 0), np.uint64))  # no signs: floats to out


@njit(cache=True, nogil=True)
def bit_conv(x, wp, alpha, bias, geometry):
    """bit_conv_into a new array. One compiled entry point, so a call pays numba's dispatch once."""
    kh, kw, _, o = wp.shape
    out = np.empty(output_shape(x.shape[0], x.shape[2], x.shape[3], kh, kw, o, geometry), np.float32)
    bit_conv_into(x, wp, alpha, bias, geometry, out)
    return out


def cold_cache(kernel=None) -> str | None:
    """The folder numba will write the compiled `kernel` (default bit_conv) to, when it has no compiled copy there
    yet (the first use on this machine then pauses for the compile, ~7 s); None when the cache is warm or cannot
    be told."""
    import os

    try:  # numba's cache object is not public API: any change there only silences the notice
        index = (kernel or bit_conv)._cache._cache_file._index_path
    except AttributeError:
        return None
    return None if os.path.exists(index) else os.path.dirname(index)
