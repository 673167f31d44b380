"""Custom-op bridge cost per call: session.run of a lowered single BitConv minus its kernel alone, on the C ABI
path (runtime/cabi.py + ortshim.c) and on the PyOp bridge, in one process.

    python benchmarks/bridge.py

Layers: C = O = 64 at 56x56 (the issue's row) and at 8x8 (where the bridge is most of the call), batch 1 and 8.
The kernel alone is kernels.bitconv.bit_conv called from Python on the same arrays (its numba dispatch, ~1-2 us,
counts as kernel, so the bridge figure is if anything low by that much). The two sessions are timed in
alternating blocks (common.paired_ms); the kernel alone right after. onnxruntime's own floor: session.run of a
model with one Neg on a tensor of the output's shape (the binding, the feed, one output): the C path's cost
beyond that floor is what the custom op adds. Goal: C path <= 5 us at batch 1.
"""
import os
import sys

import numpy as np
from onnx import numpy_helper

os.environ.pop("ONNXOPT_KERNEL_PATH", None)
from common import conv_model, median_ms, paired_ms  # noqa: E402

import onnxopt  # noqa: E402
from onnxopt.kernels import bitconv  # noqa: E402
from onnxopt.runtime import cabi, pyop  # noqa: E402


def session(model, library):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.register_custom_ops_library(library)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def floor_us(shape) -> float:
    """session.run of one Neg on `shape`: what any one-op session costs per call."""
    import onnxruntime as ort
    from onnx import helper

    graph = helper.make_graph([helper.make_node("Neg", ["x"], ["y"])], "floor",
                              [helper.make_tensor_value_info("x", 1, list(shape))],
                              [helper.make_tensor_value_info("y", 1, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.ones(shape, np.float32)
    return median_ms(lambda: sess.run(None, {"x": x}), repeat=1000) * 1e3


def main():
    print(f"C path: {cabi.path()}")
    print("| layer | batch | session.run C µs | session.run PyOp µs | kernel alone µs | bridge C µs | "
          "bridge PyOp µs | onnxruntime floor µs | C beyond floor µs |\n|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for c, h in ((64, 56), (64, 8)):
        lowered = onnxopt.binarize_convolution(conv_model(c, c))
        constants = {t.name: numpy_helper.to_array(t) for t in lowered.graph.initializer}
        node = lowered.graph.node[0]
        args = [constants[name] for name in node.input[1:]]
        fast, slow = session(lowered, cabi.library_path()), session(lowered, pyop.register())
        for batch in (1, 8):
            x = np.random.default_rng(0).standard_normal((batch, c, h, h)).astype(np.float32)
            assert np.array_equal(fast.run(None, {"x": x})[0], slow.run(None, {"x": x})[0])
            t_c, t_py = paired_ms(lambda: fast.run(None, {"x": x}), lambda: slow.run(None, {"x": x}), block=40)
            t_k = median_ms(lambda: bitconv.bit_conv(x, *args), repeat=300)
            bridge_c, bridge_py = (t_c - t_k) * 1e3, (t_py - t_k) * 1e3
            floor = floor_us(fast.run(None, {"x": x})[0].shape)
            if batch == 1:
                worst = max(worst, bridge_c - floor)
            print(f"| {c}x{h}x{h} | {batch} | {t_c * 1e3:.1f} | {t_py * 1e3:.1f} | {t_k * 1e3:.1f} | "
                  f"{bridge_c:.1f} | {bridge_py:.1f} | {floor:.1f} | {bridge_c - floor:.1f} |", flush=True)
    print(f"C path at batch 1, worst row, beyond onnxruntime's own floor: {worst:.1f} µs (goal <= 5 µs)")
    return worst


if __name__ == "__main__":
    sys.exit(0 if main() > -1e9 else 1)
