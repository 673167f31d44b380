"""The com.onnxopt custom ops, registered in onnxruntime through onnxruntime-extensions' PyOp.

- BinaryConv (trainable form): X, W (float), alpha, bias, geometry → reference float emulation.
- BitConv (lowered form): X, W packed (uint64 [kh, kw, words, O]), alpha, bias, geometry → numba kernel.

Importing this module registers both, once per process (a second registration of the same op type
fails in onnxruntime-extensions). A Python exception inside an op aborts the process, so inputs are
validated before `run` (see `guard_session`) and at lowering time, and op bodies only compute.
"""
from __future__ import annotations

import numpy as np
from onnxruntime_extensions import PyCustomOpDef, PyOp, get_library_path, onnx_op
from onnxruntime_extensions._ocos import Opdef

from .kernels import bitconv, reference
from .model import CUSTOM_DOMAIN


def library_path() -> str:
    return get_library_path()


@onnx_op(op_type=f"{CUSTOM_DOMAIN}::BinaryConv",
         inputs=[PyOp.dt_float, PyOp.dt_float, PyOp.dt_float, PyOp.dt_float, PyOp.dt_int64],
         outputs=[PyOp.dt_float])
def binary_conv(x, w, alpha, bias, geometry):
    return reference.binary_conv(x, w, alpha, bias, geometry)


@onnx_op(op_type=f"{CUSTOM_DOMAIN}::BitConv",
         inputs=[PyOp.dt_float, PyOp.dt_uint64, PyOp.dt_float, PyOp.dt_float, PyOp.dt_int64],
         outputs=[PyOp.dt_float])
def bit_conv(x, w_packed, alpha, bias, geometry):
    x4 = x[:, :, None, :] if geometry[0] == 1 else x
    out = bitconv.bit_conv(np.ascontiguousarray(x4, dtype=np.float32), w_packed, alpha, bias, geometry)
    return out[:, :, 0, :] if geometry[0] == 1 else out


def _invoke(op_id, feed, attributes):
    """Replaces onnxruntime-extensions' default bridge, which converts outputs with tolist()
    (30 ms for a 1×64×56×56 tensor); the C++ side takes numpy arrays as they are."""
    op = Opdef._odlist[op_id]
    result = op.body(*feed, **op.cast_attributes(attributes))
    outputs = result if isinstance(result, tuple) else (result,)
    flat = []
    for arr in outputs:
        flat.append(arr.shape)
        flat.append(np.ascontiguousarray(arr))
    return (op_id, *flat)


PyCustomOpDef.install_hooker(_invoke)


def guard_session(sess, model) -> None:
    """Make `sess.run` check feeds against the model's declared inputs first, so a wrong feed raises
    OnnxoptError in Python instead of reaching a custom op (where an exception aborts the process)."""
    from .runtime import check_feed, graph_inputs

    inputs = graph_inputs(model)
    plain_run = sess.run

    def run(output_names, input_feed, run_options=None):
        for name, value in input_feed.items():
            if name not in inputs:
                raise ValueError(f"unknown input '{name}'; the model's inputs are {', '.join(inputs)}")
            check_feed(name, np.asarray(value), inputs[name])
        return plain_run(output_names, input_feed, run_options)

    sess.run = run
