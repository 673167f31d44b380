"""The C entry points of the packed-bit chain ops (PackSigns, PackedBitConv, PackedBitConvSigns; runtime/cabi.py says
how the C path works, kernels/chain.py what they compute), imported when a session first chains layers."""
from __future__ import annotations

import numpy as np
from numba import carray, cfunc, njit

from ..graph import schemas as ops
from ..kernels.chain import pack_signs_into, packed_conv_into
from .cabi import COMPUTE, KERNEL_FAILED, MAX_INPUTS, OUT, SHAPE, chained_shape, chained_tensors, pack_signs_shape


@cfunc(SHAPE, nogil=True, cache=True)
def _pack_signs_shape(dims, data):
    return pack_signs_shape(dims)


@cfunc(COMPUTE, nogil=True, cache=True)
def _pack_signs_compute(data, dims):
    x = carray(data[0], (dims[1], dims[2], dims[3], dims[4]), np.float32)
    try:  # see cabi_bitconv.py
        pack_signs_into(x, carray(data[MAX_INPUTS], (dims[OUT], dims[OUT + 1], dims[OUT + 2], dims[OUT + 3]),
                                  np.uint64))
    except Exception:  # noqa: BLE001
        return KERNEL_FAILED
    return 0


@njit(cache=True, nogil=True)
def _run_chained(data, dims, emit_signs):
    """PackedBitConv (float output) or PackedBitConvSigns (sign bits) on tensors chained_shape accepted."""
    bits, wp, alpha, bias, geometry, pool = chained_tensors(data, dims)
    shape = (dims[OUT], dims[OUT + 1], dims[OUT + 2], dims[OUT + 3])
    try:  # see cabi_bitconv.py
        if emit_signs:
            signs = carray(data[MAX_INPUTS], shape, np.uint64)
            packed_conv_into(bits, pool, wp, alpha, bias, geometry, np.empty((0, 0, 0, 0), np.float32), signs)
        else:
            out = carray(data[MAX_INPUTS], shape, np.float32)
            packed_conv_into(bits, pool, wp, alpha, bias, geometry, out, np.empty((0, 0, 0, 0), np.uint64))
    except Exception:  # noqa: BLE001
        return KERNEL_FAILED
    return 0


@cfunc(SHAPE, nogil=True, cache=True)
def _packed_shape(dims, data):
    return chained_shape(dims, data, False)


@cfunc(COMPUTE, nogil=True, cache=True)
def _packed_compute(data, dims):
    return _run_chained(data, dims, False)


@cfunc(SHAPE, nogil=True, cache=True)
def _signs_shape(dims, data):
    return chained_shape(dims, data, True)


@cfunc(COMPUTE, nogil=True, cache=True)
def _signs_compute(data, dims):
    return _run_chained(data, dims, True)


ENTRY_POINTS = {ops.PACK_SIGNS: (_pack_signs_shape, _pack_signs_compute),
                ops.PACKED_BIT_CONV: (_packed_shape, _packed_compute),
                ops.PACKED_BIT_CONV_SIGNS: (_signs_shape, _signs_compute)}
