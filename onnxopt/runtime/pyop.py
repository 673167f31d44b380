"""The com.onnxopt ops in onnxruntime, through onnxruntime-extensions' PyOp.

- BinaryConv (trainable form): the float emulation (kernels.reference).
- BitConv (lowered form): the numba bit-packed kernel (kernels.bitconv).
- MultibitConv / MultibitBitConv: the same pair for residual multi-bit binarization (kernels.reference,
  kernels.multibit).

Nothing happens at import: `register()` (called by `runtime.session_options`) declares the ops once per
process (onnxruntime-extensions refuses a second declaration of the same op type) and installs the
call bridge. A Python exception inside an op aborts the whole process, so the op bodies validate their
inputs (`ops.constants_problem`, `ops.input_problem`) and answer a bad call with an empty output and one
line on stderr instead of raising; guarded sessions refuse such feeds before the op is reached.
"""
from __future__ import annotations

import sys
import threading

import numpy as np

from ..graph import schemas as ops

_lock = threading.Lock()
_ours: dict[int, object] = {}  # onnxruntime-extensions op id → our op body
_library_path: str | None = None


def _binary_conv(x, w, alpha, bias, geometry):
    from ..kernels import reference

    return reference.binary_conv(x, w, alpha, bias, geometry)


def _multibit_conv(x, w, alpha, bias, geometry):
    from ..kernels import reference

    return reference.multibit_conv(x, w, alpha, bias, geometry)


def _packed(kernel_name: str):
    """A lowered op's body: the numba kernel `kernel_name` (kernels.bitconv.bit_conv or
    kernels.multibit.multibit_bit_conv), Conv1d input given a height of 1."""
    def body(x, w_packed, alpha, bias, geometry):
        from ..kernels import bitconv, multibit

        kernel = {"bit_conv": bitconv.bit_conv, "multibit_bit_conv": multibit.multibit_bit_conv}[kernel_name]
        compile_notice(bitconv.bit_conv)
        x4 = x[:, :, None, :] if geometry[0] == 1 else x
        out = kernel(np.ascontiguousarray(x4, dtype=np.float32), w_packed, alpha, bias, geometry)
        return out[:, :, 0, :] if geometry[0] == 1 else out
    return body


_bit_conv, _multibit_bit_conv = _packed("bit_conv"), _packed("multibit_bit_conv")


_noticed = False  # one notice per process
_looked_up: set = set()  # kernels whose cache was looked at already


def compile_notice(kernel) -> None:
    """One line on stderr before the first compile of the kernel on this machine, so a ~7 s pause has a reason
    (`kernel`: the numba function whose cache tells)."""
    from ..kernels import bitconv

    global _noticed
    if _noticed or kernel in _looked_up:
        return
    _looked_up.add(kernel)
    folder = bitconv.cold_cache(kernel)
    if folder is not None:
        _noticed = True
        sys.stderr.write(f"onnxopt: compiling the bit-packed convolution kernel for this CPU (once, a few seconds; "
                         f"cached in {folder})\n")
        sys.stderr.flush()


# How many PyOp bodies failed, and the last reason. An exception there aborts the process (onnxruntime-extensions lets a
# pybind11 error escape as a C++ terminate), so a body returns an empty output instead, and onnxopt's own
# sessions (runtime/__init__.py) raise when a run added to the count.
failures = {"count": 0, "last": ""}


def _guarded(op_type: str, body):
    """The op body, run only on inputs the kernel can index; otherwise an empty output, never an exception.

    What decides whether the kernel can index its inputs is their shapes, dtypes and the geometry values,
    so the verdict is cached on those (the full check takes ~40 µs, the cache lookup ~3 µs per call)."""
    verdicts: dict[tuple, str | None] = {}

    def run(x, w, alpha, bias, geometry):
        try:
            key = (geometry.tobytes(), x.shape, x.dtype.str, w.shape, w.dtype.str, alpha.shape, alpha.dtype.str,
                   bias.shape, bias.dtype.str)
            if key not in verdicts:
                if len(verdicts) > 1024:
                    verdicts.clear()
                verdicts[key] = ops.constants_problem(op_type, w, alpha, bias, geometry) or \
                    ops.input_problem(op_type, list(x.shape), w, geometry)
            problem = verdicts[key]
            if problem is None:
                return body(x, w, alpha, bias, geometry)
        except Exception as exc:  # noqa: BLE001 - an exception here would abort the process
            problem = f"{type(exc).__name__}: {exc}"
        print(f"onnxopt: error: {op_type}: {problem}; returning an empty output", file=sys.stderr)
        failures["count"] += 1
        failures["last"] = f"{op_type}: {problem}"
        return np.zeros((0,), np.float32)
    return run


def _invoke(op_id, feed, attributes):
    """Replaces onnxruntime-extensions' default bridge, which converts outputs with tolist()
    (30 ms for a 1×64×56×56 tensor); the C++ side takes numpy arrays as they are. Ops that are not
    ours go to the library's own bridge."""
    body = _ours.get(op_id)
    if body is None:
        from onnxruntime_extensions import _ocos  # the library's default bridge; no public name for it

        return _ocos._on_pyop_invocation(op_id, feed, attributes)
    out = body(*feed)
    return op_id, out.shape, np.ascontiguousarray(out)


def register() -> str:
    """Declare the ops (once per process) and return the custom-op library path for SessionOptions."""
    global _library_path
    with _lock:
        if _library_path is None:
            from onnxruntime_extensions import PyCustomOpDef, PyOp, get_library_path, onnx_op

            signatures = {ops.BINARY_CONV: (PyOp.dt_float, _binary_conv), ops.BIT_CONV: (PyOp.dt_uint64, _bit_conv),
                          ops.MULTIBIT_CONV: (PyOp.dt_float, _multibit_conv),
                          ops.MULTIBIT_BIT_CONV: (PyOp.dt_uint64, _multibit_bit_conv)}
            for op_type, (weight_type, body) in signatures.items():
                declared = onnx_op(op_type=f"{ops.DOMAIN}::{op_type}",
                                   inputs=[PyOp.dt_float, weight_type, PyOp.dt_float, PyOp.dt_float, PyOp.dt_int64],
                                   outputs=[PyOp.dt_float])(body)
                _ours[declared._id] = _guarded(op_type, body)  # the id the library passes to the bridge
            PyCustomOpDef.install_hooker(_invoke)
            _library_path = get_library_path()
    return _library_path
