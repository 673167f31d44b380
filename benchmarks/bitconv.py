"""Lowered 3x3 binary convolution (the native library, runtime/native) vs onnxruntime's float Conv, same process.

    python benchmarks/bitconv.py                 # the register tile this CPU runs (AVX-512 VPOPCNTQ here)
    python benchmarks/bitconv.py --isa avx2      # the AVX2 tile (or generic), in a child process

Rows (C = O, H = W), pad 1, batch 1 and 8: the small layers real models are made of, (8, 56), (16, 28), (32, 14),
(32, 28), (64, 14), and the benchmark layers (64, 56) ... (512, 7). Speed-up = float Conv median latency / BitConv
median latency, raw onnxruntime sessions on both sides (same threads), timed in alternating blocks.
Also: the whole cost of a lowered op on a 1x8x8x8 input (session run of the one-op model minus the same session
run with Identity in its place): what a call costs beyond its arithmetic.
"""
import os
import subprocess
import sys

import numpy as np
import onnxruntime as ort
from common import conv_model, paired_ms, single_node_model

import onnxopt
from onnxopt.runtime import native

SMALL = [(8, 56), (16, 28), (32, 14), (32, 28), (64, 14)]
LARGE = [(64, 56), (128, 28), (256, 14), (512, 7)]
GOALS = {1: 1.5, 8: 2.0}  # small rows: at least this speed-up at batch 1 and 8


def raw_session(model, library=None):
    so = ort.SessionOptions()
    if library:
        so.register_custom_ops_library(library)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def call_cost_us(library):
    """Median run time of a one-BitConv model on 1x8x8x8 minus that of the same model with Identity (µs)."""
    from onnx import helper

    lowered = onnxopt.binarize_convolution(conv_model(8, 8))
    identity = single_node_model(helper.make_node("Identity", ["x"], ["y"]), list(lowered.graph.input), {})
    x = np.random.default_rng(0).standard_normal((1, 8, 8, 8)).astype(np.float32)
    op, empty = raw_session(lowered, library), raw_session(identity)
    t_op, t_empty = paired_ms(lambda: op.run(None, {"x": x}), lambda: empty.run(None, {"x": x}), rounds=9, block=200)
    return (t_op - t_empty) * 1e3


def main(batches=(1, 8)):
    library = native.library_path()
    print(f"native library: {native.path()}; cores: {os.cpu_count()}; onnxruntime {ort.__version__}")
    print(f"{'C=O':>4} {'H':>3} {'batch':>5} | {'float ms':>9} {'lowered ms':>10} | {'speed-up':>8}")
    rng = np.random.default_rng(0)
    missed = []
    for c, h in SMALL + LARGE:
        model = conv_model(c, c)
        float_sess, bit_sess = raw_session(model), raw_session(onnxopt.binarize_convolution(model), library)
        for batch in batches:
            x = rng.standard_normal((batch, c, h, h)).astype(np.float32)
            t_float, t_bit = paired_ms(lambda: float_sess.run(None, {"x": x}), lambda: bit_sess.run(None, {"x": x}))
            ratio = t_float / t_bit
            if (c, h) in SMALL and ratio < GOALS[batch]:
                missed.append(f"C{c}@{h} batch {batch}: {ratio:.2f}x")
            print(f"{c:>4} {h:>3} {batch:>5} | {t_float:>9.4f} {t_bit:>10.4f} | {ratio:>7.2f}x")
    print(f"small rows below their goal ({GOALS[1]}x batch 1, {GOALS[8]}x batch 8): {', '.join(missed) or 'none'}")
    print(f"a lowered op on 1x8x8x8, whole cost beyond an Identity: {call_cost_us(library):.1f} us (goal: <= 5 us "
          "beyond the kernel)")
    return not missed


if __name__ == "__main__":
    if "--isa" in sys.argv:
        isa = sys.argv[sys.argv.index("--isa") + 1]
        sys.exit(subprocess.call([sys.executable, __file__], env={**os.environ, "ONNXOPT_NATIVE_ISA": isa}))
    sys.exit(0 if main() else 1)
