"""Time to factor one 4096 x 25088 Gemm (VGG's fc6 shape) at rank 10%, the whole API call.

    python benchmarks/factor_time.py

Goal: <= 10 s on the 2-core machine (numpy's full SVD of this matrix takes ~150 s there).
"""
import time

import numpy as np
import onnx
from common import single_node_model
from onnx import helper

import onnxopt


def main(m=25088, n=4096, rank="0.1"):
    rng = np.random.default_rng(0)
    # a weight with a decaying spectrum, like trained layers have
    w = (rng.standard_normal((n, 512)).astype(np.float32) @ rng.standard_normal((512, m)).astype(np.float32)) / 32
    w += rng.standard_normal((n, m)).astype(np.float32) * 0.1
    node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc6", transB=1)
    model = single_node_model(node, [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", m])],
                              {"w": w, "b": np.zeros(n, np.float32)})
    t = time.perf_counter()
    _, report = onnxopt.factor_with_report(model, rank=rank)
    seconds = time.perf_counter() - t
    layer = report.layers[0]
    print(f"factor {n}x{m} Gemm at rank {rank} (k={layer.rank}): {seconds:.2f} s, "
          f"relative error {layer.error:.4f}, goal <= 10 s: {'met' if seconds <= 10 else 'NOT met'}")


if __name__ == "__main__":
    main()
