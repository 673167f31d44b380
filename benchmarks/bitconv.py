"""Bit-packed 3x3 convolution through an onnxruntime session vs onnxruntime's float Conv, same process.

    python benchmarks/bitconv.py                 # host ISA (AVX-512 here)
    python benchmarks/bitconv.py --avx2          # the same in a child process with AVX2-only numba code

Rows: (C = O, H = W) in {(64, 56), (128, 28), (256, 14), (512, 7)}, batch 1 and 8, pad 1.
Speed-up = float Conv median latency / lowered BitConv median latency, the two timed alternately.
Also prints the custom-op bridge's per-call cost for a 1x64x56x56 tensor.
"""
import os
import subprocess
import sys

import numpy as np
from common import conv_model, isa_label, kernel_timer, median_ms, paired_ms

import onnxopt
from onnxopt.kernels import AVX2_ONLY_ENV

ROWS = [(64, 56), (128, 28), (256, 14), (512, 7)]
GOAL = 5.0


def bridge_overhead_ms():
    """Session run time minus the kernel's own time, for the 1x64x56x56 layer at batch 1, on the PyOp bridge (the
    kernel timer wraps the Python entry point; the C path and both bridges side by side: bridge.py)."""
    import onnxruntime as ort

    so = onnxopt.session_options()  # without model=: the PyOp bridge
    sess = ort.InferenceSession(onnxopt.binarize_convolution(conv_model(64, 64)).SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 64, 56, 56)).astype(np.float32)
    with kernel_timer() as seconds:
        total = median_ms(lambda: sess.run(None, {"x": x}), repeat=200)
    return total, float(np.median(seconds)) * 1e3


def main(batches=(1, 8)):
    print(f"numba ISA: {isa_label()}; cores: {os.cpu_count()}")
    print(f"{'C=O':>4} {'H':>3} {'batch':>5} | {'float ms':>9} {'bitconv ms':>10} | {'speed-up':>8}")
    rng = np.random.default_rng(0)
    worst = float("inf")
    for c, h in ROWS:
        model = conv_model(c, c)
        float_sess, bit_sess = onnxopt.session(model), onnxopt.session(onnxopt.binarize_convolution(model))
        for batch in batches:
            x = rng.standard_normal((batch, c, h, h)).astype(np.float32)
            t_float, t_bit = paired_ms(lambda: float_sess.run(None, {"x": x}), lambda: bit_sess.run(None, {"x": x}))
            worst = min(worst, t_float / t_bit)
            print(f"{c:>4} {h:>3} {batch:>5} | {t_float:>9.3f} {t_bit:>10.3f} | {t_float / t_bit:>7.2f}x")
    print(f"slowest row: {worst:.2f}x (goal {GOAL}x on AVX-512, 2x with AVX2 only)")
    total, kernel = bridge_overhead_ms()
    print(f"PyOp bridge, 1x64x56x56: session run {total:.3f} ms, kernel {kernel:.3f} ms, "
          f"per-call overhead {total - kernel:.3f} ms (goal <= 0.5 ms)")
    return worst


if __name__ == "__main__":
    if "--avx2" in sys.argv:
        sys.exit(subprocess.call([sys.executable, __file__], env={**os.environ, **AVX2_ONLY_ENV}))
    sys.exit(0 if main() > 0 else 1)
