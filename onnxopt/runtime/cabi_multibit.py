"""The C entry points of com.onnxopt::MultibitBitConv (runtime/cabi.py says how the C path works), imported when a
model first needs them."""
from __future__ import annotations

import numpy as np
from numba import carray, cfunc

from ..graph import schemas as ops
from ..kernels.multibit import multibit_bit_conv_into
from .cabi import ALPHA, COMPUTE, KERNEL_FAILED, SHAPE, shape, tensors


@cfunc(SHAPE, nogil=True, cache=True)
def _multibit_shape(dims, data):
    return shape(dims, data, True)


@cfunc(COMPUTE, nogil=True, cache=True)
def _multibit_compute(data, dims):
    x, wp, bias, geometry, out = tensors(data, dims)
    alpha = carray(data[2], (dims[ALPHA + 1], dims[ALPHA + 2]), np.float32)
    try:  # see cabi_bitconv.py
        multibit_bit_conv_into(x, wp, alpha, bias, geometry, out)
    except Exception:  # noqa: BLE001
        return KERNEL_FAILED
    return 0


ENTRY_POINTS = {ops.MULTIBIT_BIT_CONV: (_multibit_shape, _multibit_compute)}
