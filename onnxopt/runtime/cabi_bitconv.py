"""The C entry points of com.onnxopt::BitConv (runtime/cabi.py says how the C path works), imported when a model
first needs them."""
from __future__ import annotations

import numpy as np
from numba import carray, cfunc

from ..graph import schemas as ops
from ..kernels.bitconv import bit_conv_into
from .cabi import ALPHA, COMPUTE, KERNEL_FAILED, SHAPE, shape, tensors


@cfunc(SHAPE, nogil=True, cache=True)
def _bit_conv_shape(dims, data):
    return shape(dims, data, False)


@cfunc(COMPUTE, nogil=True, cache=True)
def _bit_conv_compute(data, dims):
    x, wp, bias, geometry, out = tensors(data, dims)
    try:  # a numba exception cannot leave a cfunc: without this, a failure returns success over an unwritten output
        bit_conv_into(x, wp, carray(data[2], (dims[ALPHA + 1],), np.float32), bias, geometry, out)
    except Exception:  # noqa: BLE001
        return KERNEL_FAILED
    return 0


ENTRY_POINTS = {ops.BIT_CONV: (_bit_conv_shape, _bit_conv_compute)}
