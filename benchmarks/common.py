"""Shared by the benchmark scripts: timing and tiny model builders."""
import contextlib
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


def alternating_ms(fns, rounds=7, block=15, settle_s=0.06):
    """Median ms of each of `fns`, timed in alternating blocks: machine noise (this VM shares its cores)
    lands on every side of a ratio alike, while each side still runs back to back as a user's model
    would (calling them strictly in turn measures the thread pools waking each other instead)."""
    times = [[] for _ in fns]
    for _ in range(rounds):
        for fn, took in zip(fns, times):
            # the first calls of a block pay for the other pool winding down: an onnxruntime session with
            # spinning on (the float side) keeps a core busy for tens of ms after its last run, and a 3 ms
            # multi-bit conv ran 2x slower for its first ~15 calls (measured; 50 ms of quiet removed it)
            start, calls = time.perf_counter(), 0
            while calls < 5 or time.perf_counter() - start < settle_s:
                fn()
                calls += 1
            for _ in range(block):
                t = time.perf_counter()
                fn()
                took.append((time.perf_counter() - t) * 1e3)
    return [statistics.median(took) for took in times]


def paired_ms(fa, fb, rounds=7, block=15):
    """alternating_ms of two functions."""
    return tuple(alternating_ms([fa, fb], rounds, block))


@contextlib.contextmanager
def kernel_timer():
    """Times every call of the numba kernel behind BitConv (onnxopt.kernels.bitconv.bit_conv) while active;
    yields the list of seconds, one per call."""
    from onnxopt.kernels import bitconv

    seconds, plain = [], bitconv.bit_conv

    def timed(*args):
        t = time.perf_counter()
        out = plain(*args)
        seconds.append(time.perf_counter() - t)
        return out

    bitconv.bit_conv = timed
    try:
        yield seconds
    finally:
        bitconv.bit_conv = plain


def isa_label():
    """What the bit-packed kernel compiles to in this process: the host's ISA unless --avx2 forced AVX2 code."""
    import os

    from onnxopt.kernels import bitconv

    if "avx512" not in os.environ.get("NUMBA_CPU_FEATURES", "avx512"):
        return "AVX2 only (forced)"
    return "host, AVX-512 VPOPCNTQ" if bitconv.WIDE else "host, AVX2 (no AVX-512 on this CPU)"


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


def vgg_model(widths=(64, 128, 256, 512), classes=10, size=32, seed=0, batch_norm=True):
    """VGG-style CNN: per width two 3x3 convs (+ BatchNormalization) + ReLU, then 2x2 max-pool; Gemm head.
    The first conv is named /first_conv/Conv (what `--skip first_conv` keeps float). Random weights:
    for latency, not accuracy."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], {}
    x, c = "input", 3
    for stage, width in enumerate(widths):
        for j in range(2):
            name = "/first_conv/Conv" if (stage, j) == (0, 0) else f"/stage{stage}/conv{j}/Conv"
            inits[f"{name}.w"] = (rng.standard_normal((width, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)
            inits[f"{name}.b"] = (0.1 * rng.standard_normal(width)).astype(np.float32)
            nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [f"{name}.y"], name=name,
                                          pads=[1, 1, 1, 1]))
            x, c = f"{name}.y", width
            if batch_norm:
                bn = name.replace("Conv", "BatchNormalization")
                inits[f"{bn}.scale"] = (1 + 0.1 * rng.standard_normal(width)).astype(np.float32)
                inits[f"{bn}.bias"] = (0.1 * rng.standard_normal(width)).astype(np.float32)
                inits[f"{bn}.mean"] = (0.1 * rng.standard_normal(width)).astype(np.float32)
                inits[f"{bn}.var"] = (1 + 0.1 * rng.random(width)).astype(np.float32)
                nodes.append(helper.make_node("BatchNormalization", [x, f"{bn}.scale", f"{bn}.bias", f"{bn}.mean",
                                                                     f"{bn}.var"], [f"{bn}.y"], name=bn))
                x = f"{bn}.y"
            nodes.append(helper.make_node("Relu", [x], [f"{name}.relu"], name=name.replace("Conv", "Relu")))
            x = f"{name}.relu"
        nodes.append(helper.make_node("MaxPool", [x], [f"pool{stage}"], name=f"/pool{stage}/MaxPool",
                                      kernel_shape=[2, 2], strides=[2, 2]))
        x = f"pool{stage}"
    side = size // 2 ** len(widths)
    nodes.append(helper.make_node("Flatten", [x], ["flat"], name="/flatten/Flatten"))
    inits["fc.w"] = (rng.standard_normal((classes, c * side * side)) / np.sqrt(c * side * side)).astype(np.float32)
    inits["fc.b"] = np.zeros(classes, np.float32)
    nodes.append(helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="/fc/Gemm", transB=1))
    graph = helper.make_graph(
        nodes, "vgg", [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", classes])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
