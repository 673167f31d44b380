"""Bit-packed 3x3 convolution through an onnxruntime session vs onnxruntime's float Conv, same process.

    python benchmarks/bitconv.py            # host ISA (AVX-512 here)
    NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES="+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+f16c,+fma,+lzcnt,+movbe,+popcnt,+sse,+sse2,+sse3,+sse4.1,+sse4.2,+ssse3,+xsave" python benchmarks/bitconv.py   # AVX2 only

Rows: (C = O, H = W) in {(64, 56), (128, 28), (256, 14), (512, 7)}, batch 1 and 8, pad 1.
Speed-up = float Conv median latency / lowered BitConv median latency.
"""
import os
import sys

import numpy as np

import onnxopt
from common import conv_model, median_ms

ROWS = [(64, 56), (128, 28), (256, 14), (512, 7)]


def main(batches=(1, 8)):
    isa = "avx2-only" if "avx512" not in os.environ.get("NUMBA_CPU_FEATURES", "avx512") else "host"
    print(f"numba ISA: {isa}; onnxruntime threads: default; cores: {os.cpu_count()}")
    print(f"{'C=O':>4} {'H':>3} {'batch':>5} | {'float ms':>9} {'bitconv ms':>10} | {'speed-up':>8}")
    rng = np.random.default_rng(0)
    worst = float("inf")
    for c, h in ROWS:
        model = conv_model(c, c)
        lowered = onnxopt.binarize_convolution(model)
        float_sess, bit_sess = onnxopt.session(model), onnxopt.session(lowered)
        for batch in batches:
            x = rng.standard_normal((batch, c, h, h)).astype(np.float32)
            t_float = median_ms(lambda: float_sess.run(None, {"x": x}))
            t_bit = median_ms(lambda: bit_sess.run(None, {"x": x}))
            worst = min(worst, t_float / t_bit)
            print(f"{c:>4} {h:>3} {batch:>5} | {t_float:>9.3f} {t_bit:>10.3f} | {t_float / t_bit:>7.2f}x")
    print(f"slowest row: {worst:.2f}x")
    return worst


if __name__ == "__main__":
    sys.exit(0 if main() > 0 else 1)
