"""Factored vs original Gemm latency in onnxruntime (same process), next to the FLOP ratio.

    python benchmarks/factor_latency.py

Goal: latency ratio (factored / original) within 1.25x of the FLOP ratio k(m+n) / (m n).
"""
import numpy as np
import onnx
from common import median_ms, single_node_model
from onnx import helper

import onnxopt

CASES = [(1024, 1024, 128, 1), (1024, 1024, 128, 64), (4096, 1024, 256, 16), (2048, 2048, 256, 128),
         (4096, 4096, 512, 32), (784, 400, 120, 256)]


def main():
    rng = np.random.default_rng(0)
    print(f"{'m':>5} {'n':>5} {'k':>4} {'batch':>5} | {'orig ms':>8} {'factored ms':>11} | "
          f"{'latency ratio':>13} {'FLOP ratio':>10} {'lat/FLOP':>8}")
    for m, n, k, batch in CASES:
        w = rng.standard_normal((n, m)).astype(np.float32)  # Gemm transB layout: (out, in)
        node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="dense", transB=1)
        model = single_node_model(node, [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", m])],
                                  {"w": w, "b": np.zeros(n, np.float32)})
        factored = onnxopt.factor_dense(model, rank=k)
        x = rng.standard_normal((batch, m)).astype(np.float32)
        times = []
        for mod in (model, factored):
            sess = onnxopt.session(mod)
            times.append(median_ms(lambda: sess.run(None, {"x": x})))
        lat, flops = times[1] / times[0], k * (m + n) / (m * n)
        print(f"{m:>5} {n:>5} {k:>4} {batch:>5} | {times[0]:>8.3f} {times[1]:>11.3f} | "
              f"{lat:>13.3f} {flops:>10.3f} {lat / flops:>8.2f}")


if __name__ == "__main__":
    main()
