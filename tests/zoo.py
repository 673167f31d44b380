"""Graph kinds that exporters produce, one small builder per kind, for the graph-kind × command tests.

Most kinds are variations of one network, x [N, 4, 8, 8] → Conv 4→8 (3×3) → Relu → Conv 8→8 (3×3) →
GlobalAveragePool → Flatten → Gemm 8→16 → Relu → Gemm 16→10, so that factor and binarize both find work.
Weights are random; only structure matters here.

    python tests/zoo.py          # prints the graph kind × command and hostile file × command outcome tables
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT = "x"
INPUT_SHAPE = (2, 4, 8, 8)


def _rng(seed=0):
    return np.random.default_rng(seed)


class Builder:
    """Collects nodes and weights; `weights` says how a weight enters the graph."""

    def __init__(self, weights: str = "initializer", dtype=np.float32, seed: int = 0, prefix: str = ""):
        self.nodes, self.inits, self.weights, self.dtype = [], [], weights, dtype
        self.rng, self.count, self.prefix = _rng(seed), 0, prefix

    def fresh(self, base: str) -> str:
        self.count += 1
        return f"{self.prefix}{base}{self.count}"

    def weight(self, shape, name: str) -> str:
        value = (self.rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]) or 1)).astype(self.dtype)
        if self.weights == "initializer":
            self.inits.append(numpy_helper.from_array(value, name))
        elif self.weights == "constant":
            self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name)))
        elif self.weights == "chain":  # flat Constant → Reshape by a Constant shape: needs folding to see
            flat, dims = f"{name}_flat", f"{name}_shape"
            self.nodes.append(helper.make_node("Constant", [], [flat],
                                               value=numpy_helper.from_array(value.reshape(-1), flat)))
            self.nodes.append(helper.make_node("Constant", [], [dims],
                                               value=numpy_helper.from_array(np.array(shape, np.int64), dims)))
            self.nodes.append(helper.make_node("Reshape", [flat, dims], [name]))
        return name

    def bias(self, n: int, name: str) -> str:
        if self.weights != "chain":
            return self.weight((n,), name)
        shape = f"{name}_shape"  # ConstantOfShape: how the onnx backend-test zoo writes constant tensors
        self.nodes.append(helper.make_node("Constant", [], [shape],
                                           value=numpy_helper.from_array(np.array([n], np.int64), shape)))
        self.nodes.append(helper.make_node("ConstantOfShape", [shape], [name],
                                           value=numpy_helper.from_array(np.array([0.1], self.dtype))))
        return name

    def conv(self, x, cin, cout, k=3, name=None, **attrs):
        attrs.setdefault("pads", [k // 2] * 4)
        group = attrs.get("group", 1)
        w = self.weight((cout, cin // group, k, k), self.fresh("conv_w"))
        b = self.bias(cout, self.fresh("conv_b"))
        y = self.fresh("conv_y")
        self.nodes.append(helper.make_node("Conv", [x, w, b], [y], name=name if name is not None else
                                           self.fresh("conv"), **attrs))
        return y

    def gemm(self, x, m, n, name=None):
        w = self.weight((m, n), self.fresh("gemm_w"))
        b = self.bias(n, self.fresh("gemm_b"))
        y = self.fresh("gemm_y")
        self.nodes.append(helper.make_node("Gemm", [x, w, b], [y], name=name if name is not None else
                                           self.fresh("gemm")))
        return y

    def op(self, op_type, inputs, name=None, **attrs):
        y = self.fresh(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [y], name=name if name is not None else
                                           self.fresh(op_type), **attrs))
        return y

    def model(self, outputs, input_dims=INPUT_SHAPE, ir=8, opset=17, elem=TensorProto.FLOAT, shapes=None):
        """`shapes` declares output shapes that shape inference cannot work out (control flow)."""
        inputs = [helper.make_tensor_value_info(INPUT, elem, list(input_dims))]
        declared = [helper.make_tensor_value_info(o, elem, (shapes or {}).get(o)) for o in outputs]
        graph = helper.make_graph(self.nodes, "zoo", inputs, declared, self.inits)
        if ir < 4:  # IR 3: every initializer is also a graph input
            graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                               for t in self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir)
        return onnx.shape_inference.infer_shapes(model)  # declares the outputs' shapes, as exporters do


def network(b: Builder, x=INPUT, names=(None, None, None, None)):
    """The shared body; returns the logits tensor."""
    h = b.op("Relu", [b.conv(x, 4, 8, name=names[0])])
    h = b.conv(h, 8, 8, name=names[1])
    h = b.op("Flatten", [b.op("GlobalAveragePool", [h])])
    h = b.op("Relu", [b.gemm(h, 8, 16, name=names[2])])
    return b.gemm(h, 16, 10, name=names[3])


def weights_as(kind: str):
    def build():
        b = Builder(weights=kind)
        return b.model([network(b)])
    return build


def versions(ir: int, opset: int):
    def build():
        b = Builder()
        return b.model([network(b)], ir=ir, opset=opset)
    return build


def input_dims(dims):
    def build():
        b = Builder()
        return b.model([network(b)], input_dims=dims)
    return build


def minus_one_dims():
    m = input_dims(("batch", 4, 8, 8))()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1  # what some exporters write for "any"
    del m.graph.value_info[:]
    return m


def depthwise_and_grouped():
    b = Builder()
    h = b.conv(INPUT, 4, 4, group=4, name="depthwise")
    h = b.conv(h, 4, 8, group=2, name="grouped")
    h = b.conv(h, 8, 8, k=1, name="pointwise_1x1", pads=[0, 0, 0, 0])
    return b.model([h])


def conv1d():
    b = Builder()
    w = b.weight((8, 4, 3), "w1d")
    bias = b.bias(8, "b1d")
    b.nodes.append(helper.make_node("Conv", [INPUT, w, bias], ["y1"], name="conv1d", pads=[1, 1]))
    h = b.op("Relu", ["y1"])
    w2 = b.weight((8, 8, 3), "w1d_2")
    b.nodes.append(helper.make_node("Conv", [h, w2], ["y2"], name="conv1d_2", pads=[1, 1], strides=[2]))
    return b.model(["y2"], input_dims=(2, 4, 16))


def conv_batchnorm():
    b = Builder()
    h = b.conv(INPUT, 4, 8, name="first")
    h = b.conv(b.op("Relu", [h]), 8, 8, name="conv_bn")
    params = [numpy_helper.from_array(v.astype(np.float32), n) for v, n in
              ((1 + 0.1 * b.rng.standard_normal(8), "bn_scale"), (0.1 * b.rng.standard_normal(8), "bn_b"),
               (0.1 * b.rng.standard_normal(8), "bn_mean"), (1 + b.rng.random(8), "bn_var"))]
    b.inits += params
    y = b.op("BatchNormalization", [h] + [p.name for p in params], name="bn", epsilon=1e-3)
    return b.model([b.op("Relu", [y])])


def gemm_softmax():
    b = Builder()
    h = b.op("Flatten", [INPUT])
    return b.model([b.op("Softmax", [b.gemm(h, 256, 10, name="classifier")], axis=1)])


def float16():
    b = Builder(dtype=np.float16)
    return b.model([network(b)], elem=TensorProto.FLOAT16)


def _branch(name: str, body: Builder, output: str) -> onnx.GraphProto:
    return helper.make_graph(body.nodes, name, [], [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
                             body.inits)


def control_flow():
    """Gemm in both branches of an If, Conv in a Loop body, MatMul in a Scan body; a Gemm outside too."""
    b = Builder()
    logits = network(b)
    then_b, else_b = Builder(seed=1, prefix="then_"), Builder(seed=2, prefix="else_")
    then_out, else_out = then_b.gemm(logits, 10, 10, name="then_gemm"), else_b.gemm(logits, 10, 10, name="else_gemm")
    cond = b.op("ReduceSum", [logits], keepdims=0)
    cond = b.op("Greater", [cond, b.weight((), "zero")])
    b.nodes.append(helper.make_node("If", [cond], ["branch"], name="if", then_branch=_branch("then", then_b, then_out),
                                    else_branch=_branch("else", else_b, else_out)))
    # Loop: two iterations of a Conv over the input (loop-carried)
    body = Builder(seed=3, prefix="loop_")
    carried = body.conv("carry_in", 4, 4, name="loop_conv")
    loop_body = helper.make_graph(
        body.nodes + [helper.make_node("Identity", ["cond_in"], ["cond_out"])], "loop_body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("carry_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info(carried, TensorProto.FLOAT, None)], body.inits)
    b.inits += [numpy_helper.from_array(np.array(2, np.int64), "trips"),
                numpy_helper.from_array(np.array(True), "true")]
    b.nodes.append(helper.make_node("Loop", ["trips", "true", INPUT], ["looped"], name="loop", body=loop_body))
    # Scan over the batch: MatMul of each row of the logits by a constant weight
    scan = Builder(seed=4, prefix="scan_")
    w = scan.weight((10, 10), "scan_w")
    scan.nodes.append(helper.make_node("MatMul", ["row", w], ["row_out"], name="scan_matmul"))
    scan_body = helper.make_graph(scan.nodes, "scan_body",
                                  [helper.make_tensor_value_info("row", TensorProto.FLOAT, [10])],
                                  [helper.make_tensor_value_info("row_out", TensorProto.FLOAT, [10])], scan.inits)
    b.nodes.append(helper.make_node("Scan", [logits], ["scanned"], name="scan", body=scan_body, num_scan_inputs=1))
    return b.model(["branch", "looped", "scanned"], shapes={"branch": [2, 10], "looped": list(INPUT_SHAPE),
                                                              "scanned": [2, 10]})


def names_empty_and_repeated():
    b = Builder()
    return b.model([network(b, names=("", "", "dense", "dense"))])


def shared_weights():
    b = Builder()
    h = b.op("Flatten", [b.op("GlobalAveragePool", [INPUT])])
    w = b.weight((4, 4), "shared_w")
    y1 = b.op("Gemm", [h, w], name="first_use")
    y2 = b.op("Gemm", [b.op("Relu", [y1]), w], name="second_use")
    cw = b.weight((4, 4, 3, 3), "shared_conv_w")
    c1 = b.op("Conv", [INPUT, cw], name="conv_a", pads=[1, 1, 1, 1])
    c2 = b.op("Conv", [b.op("Relu", [c1]), cw], name="conv_b", pads=[1, 1, 1, 1])
    return b.model([y2, c2])


def outputs_also_intermediate():
    b = Builder()
    h = b.conv(INPUT, 4, 8, name="conv_a")
    hidden = b.conv(b.op("Relu", [h]), 8, 8, name="conv_b")
    feat = b.op("Flatten", [b.op("GlobalAveragePool", [hidden])])
    mid = b.gemm(feat, 8, 16, name="dense_a")
    logits = b.gemm(b.op("Relu", [mid]), 16, 10, name="dense_b")
    return b.model([hidden, mid, logits])  # conv_b's and dense_a's outputs are read inside and outside


KINDS = {
    "weights as initializers": weights_as("initializer"),
    "weights as Constant nodes": weights_as("constant"),
    "weights behind Reshape/ConstantOfShape chains": weights_as("chain"),
    **{f"IR {ir}, opset {op}": versions(ir, op) for ir, op in
       [(3, 9), (4, 9), (5, 10), (6, 11), (7, 13), (8, 17), (9, 19), (10, 21), (11, 26)]},
    "symbolic batch and spatial dims": input_dims(("batch", 4, "height", "width")),
    "-1 batch dim": minus_one_dims,
    "depthwise, grouped and 1x1 convs": depthwise_and_grouped,
    "Conv1d": conv1d,
    "Conv + BatchNormalization": conv_batchnorm,
    "Gemm feeding Softmax": gemm_softmax,
    "float16": float16,
    "Gemm/Conv/MatMul in If/Loop/Scan bodies": control_flow,
    "empty and repeated node names": names_empty_and_repeated,
    "weights shared by two nodes": shared_weights,
    "graph outputs that are also intermediates": outputs_also_intermediate,
}


def feeds_for(model: onnx.ModelProto, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for the model's real inputs (symbolic or -1 dims get small sizes)."""
    rng = _rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (batch if i == 0 else 8)
                for i, d in enumerate(vi.type.tensor_type.shape.dim)]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        feeds[vi.name] = rng.standard_normal(dims).astype(dtype)
    return feeds


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_graph_kinds import outcome_table
    from test_hostile import hostile_table

    print(outcome_table())
    print()
    print(hostile_table())
