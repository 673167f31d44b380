"""Shared by the benchmark scripts: timing and tiny model builders."""
import statistics
import time

import numpy as np
import onnx
from onnx import helper, numpy_helper


def median_ms(fn, repeat=30, warmup=3, min_seconds=0.3):
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
        if len(times) > 2000:
            break
    return statistics.median(times)


def single_node_model(node, inputs, inits, opset=17):
    graph = helper.make_graph([node], "bench", inputs, [helper.make_tensor_value_info(node.output[0], 1, None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def conv_model(c, o, k=3, pad=1, seed=0):
    w = np.random.default_rng(seed).standard_normal((o, c, k, k)).astype(np.float32)
    b = np.random.default_rng(seed + 1).standard_normal(o).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[pad] * 4)
    return single_node_model(node, [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", c, "H", "W"])],
                             {"w": w, "b": b})
