"""onnxopt's lowered 3x3 layer vs OpenVINO's BinaryConvolution (its CPU plugin's JIT u1 kernel), both against
onnxruntime's float Conv, on the bitconv.py rows, in several processes.

    pip install openvino        # optional benchmark dependency
    python benchmarks/vs_openvino.py [--processes 3]

Per process and row, three sessions on the same float NCHW input, timed in alternating blocks
(common.alternating_ms): onnxruntime float Conv, onnxopt (onnxopt.session of the lowered layer: the C path), and
OpenVINO: FakeQuantize(levels=2, threshold 0 → u1) → BinaryConvolution(xnor-popcount, pad_value=0: exact zero
padding) → α·y + bias (fused by the plugin), weights a u1 constant (LSB first within a byte), 2 inference
threads, its fastest call (shared input and output buffers). The outputs are compared first. Both binary
kernels change speed from process to process, so each row's figure is the median over processes, with the
range.
"""
import json
import os
import statistics
import subprocess
import sys

import numpy as np

ROWS = [(64, 56), (128, 28), (256, 14), (512, 7)]


def openvino_layer(w, alpha, bias, batch, h):
    import openvino as ov
    import openvino.opset1 as ops1

    o, c = w.shape[:2]
    x = ops1.parameter([batch, c, h, h], np.float32, name="x")
    zero, one = (ops1.constant(np.full((1, 1, 1, 1), v, np.float32)) for v in (0, 1))
    binarized = ops1.fake_quantize(x, zero, zero, zero, one, 2)  # v > 0 → 1, else 0 (the sign bit)
    bits = np.packbits((w > 0).astype(np.uint8).reshape(-1), bitorder="little")
    weights = ov.op.Constant(ov.Tensor(bits, ov.Shape(list(w.shape)), ov.Type.u1))  # shares `bits`
    conv = ops1.binary_convolution(binarized, weights, [1, 1], [1, 1], [1, 1], [1, 1], "xnor-popcount", 0.0)
    y = ops1.add(ops1.multiply(conv, ops1.constant(alpha.reshape(1, o, 1, 1))),
                 ops1.constant(bias.reshape(1, o, 1, 1)))
    compiled = ov.Core().compile_model(ov.Model([y], [x]), "CPU", {"INFERENCE_NUM_THREADS": os.cpu_count(),
                                                                    "PERFORMANCE_HINT": "LATENCY"})
    kernel = next(op.get_rt_info()["primitiveType"].astype(str) for op in compiled.get_runtime_model().get_ordered_ops()
                  if op.get_rt_info()["layerType"].astype(str) == "BinaryConvolution")
    request = compiled.create_infer_request()
    return (lambda x: request.infer({0: x}, share_inputs=True, share_outputs=True)[0]), kernel, bits


def child():
    import onnx
    from common import alternating_ms, conv_model, isa_label

    import onnxopt

    rng = np.random.default_rng(0)
    rows = []
    for c, h in ROWS:
        model = conv_model(c, c)
        lowered, _ = onnxopt.binarize(model)
        w = onnx.numpy_helper.to_array(model.graph.initializer[0])
        consts = {t.name: onnx.numpy_helper.to_array(t) for t in lowered.graph.initializer}
        node = next(n for n in lowered.graph.node if n.op_type == "BitConv")
        alpha, bias = consts[node.input[2]], consts[node.input[3]]
        float_sess, ours = onnxopt.session(model), onnxopt.session(lowered)
        for batch in (1, 8):
            x = rng.standard_normal((batch, c, h, h)).astype(np.float32)
            theirs, kernel, keep = openvino_layer(w, alpha, bias, batch, h)
            (want,) = ours.run(None, {"x": x})
            diff = float(np.abs(theirs(x) - want).max() / np.abs(want).max())
            t_float, t_ours, t_theirs = alternating_ms([lambda: float_sess.run(None, {"x": x}),
                                                        lambda: ours.run(None, {"x": x}), lambda: theirs(x)])
            rows.append(dict(c=c, h=h, batch=batch, float=t_float, onnxopt=t_ours, openvino=t_theirs, diff=diff,
                             kernel=kernel, isa=isa_label()))
            del keep
    print(json.dumps(rows))


def main(processes):
    here = os.path.dirname(os.path.abspath(__file__))
    runs = []
    for _ in range(processes):
        out = subprocess.run([sys.executable, __file__, "--child"], capture_output=True, text=True, cwd=here,
                             check=False)
        if out.returncode:
            sys.exit(f"child process failed: {out.stderr.strip().splitlines()[-1:]}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    first = runs[0][0]
    print(f"{processes} processes; numba ISA: {first['isa']}; OpenVINO kernel: {first['kernel']}")
    print("| C=O | H | batch | float ms | onnxopt ms | OpenVINO ms | onnxopt vs float | OpenVINO vs float "
          "| onnxopt / OpenVINO speed (range) | max rel diff |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    behind = 0
    for i, row in enumerate(runs[0]):
        per = [run[i] for run in runs]
        med = {k: statistics.median(p[k] for p in per) for k in ("float", "onnxopt", "openvino")}
        ratio = [p["openvino"] / p["onnxopt"] for p in per]  # > 1: onnxopt faster, same process
        behind += statistics.median(ratio) < 1
        print(f"| {row['c']} | {row['h']} | {row['batch']} | {med['float']:.3f} | {med['onnxopt']:.3f} | "
              f"{med['openvino']:.3f} | {statistics.median(p['float'] / p['onnxopt'] for p in per):.2f}x | "
              f"{statistics.median(p['float'] / p['openvino'] for p in per):.2f}x | "
              f"{statistics.median(ratio):.2f}x ({min(ratio):.2f}-{max(ratio):.2f}) | "
              f"{max(p['diff'] for p in per):.1e} |")
    print(f"rows where OpenVINO is faster (median over processes): {behind} of {len(runs[0])}")
    return behind


if __name__ == "__main__":
    if "--child" in sys.argv:
        child()
    else:
        count = int(sys.argv[sys.argv.index("--processes") + 1]) if "--processes" in sys.argv else 3
        sys.exit(1 if main(count) else 0)
