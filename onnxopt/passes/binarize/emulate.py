"""emulate: BinaryConv → standard ONNX ops, so external trainers (onnx2torch, ...) can read the model.

    y = Conv(Where(X > 0, 1, −1), Where(W > 0, 1, −1)) · α + B

The float latent weights W stay an initializer. The last node (Add) keeps the BinaryConv's name and
is marked in its doc_string, which is how `lower` finds the pattern again (EmulatedRule in lower.py).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ...graph import schemas as ops
from ...graph.context import GraphContext
from ...graph.nodes import node_attributes
from ...kernels.geometry import Geometry, geometry_problem
from ...report import LayerReport
from ..rules import Rewrite, Rule

MARKER = "onnxopt:emulated BinaryConv"


class BinaryConvToStandard(Rule):
    def check(self, node: onnx.NodeProto, ctx: GraphContext) -> str | None:
        if len(node.input) != 5 or ctx.constant(node.input[4]) is None:
            return "geometry is not a constant"
        return geometry_problem(ctx.constant(node.input[4]))

    def rewrite(self, node: onnx.NodeProto, ctx: GraphContext) -> Rewrite:
        name = ctx.name_of(node)
        x, w, alpha, bias, geometry = node.input
        g = Geometry.decode(ctx.constant(geometry))
        ones = ctx.initializer(f"{name}/emulate_one", np.array(1, np.float32))
        minus = ctx.initializer(f"{name}/emulate_minus_one", np.array(-1, np.float32))
        zero = ctx.initializer(f"{name}/emulate_zero", np.array(0, np.float32))
        shape = ctx.initializer(f"{name}/emulate_channel_shape",
                                np.array([1, -1] + [1] * g.spatial_rank, np.int64))
        t = {k: ctx.fresh(f"{name}/emulate_{k}") for k in
             ("x_pos", "x_sign", "w_pos", "w_sign", "conv", "alpha", "bias", "scaled")}
        nodes = [
            helper.make_node("Greater", [x, zero.name], [t["x_pos"]], name=t["x_pos"]),
            helper.make_node("Where", [t["x_pos"], ones.name, minus.name], [t["x_sign"]], name=t["x_sign"]),
            helper.make_node("Greater", [w, zero.name], [t["w_pos"]], name=t["w_pos"]),
            helper.make_node("Where", [t["w_pos"], ones.name, minus.name], [t["w_sign"]], name=t["w_sign"]),
            helper.make_node("Conv", [t["x_sign"], t["w_sign"]], [t["conv"]], name=t["conv"], **g.conv_attributes()),
            helper.make_node("Reshape", [alpha, shape.name], [t["alpha"]], name=t["alpha"]),
            helper.make_node("Reshape", [bias, shape.name], [t["bias"]], name=t["bias"]),
            helper.make_node("Mul", [t["conv"], t["alpha"]], [t["scaled"]], name=t["scaled"]),
            helper.make_node("Add", [t["scaled"], t["bias"]], list(node.output), name=node.name or name,
                             doc_string=MARKER),
        ]
        return Rewrite(nodes=nodes, initializers=[ones, minus, zero, shape],
                       layer=_emulated_layer(name, "BinaryConv", ctx.constant(w)))


MULTIBIT_MARKER = "onnxopt:emulated MultibitConv"


class _Emitter:
    """Nodes with fresh names under one layer's prefix."""

    def __init__(self, ctx: GraphContext, name: str):
        self.ctx, self.name, self.nodes, self.inits = ctx, name, [], []
        self.opset = next((o.version for o in ctx.model.opset_import if o.domain in ("", "ai.onnx")), 1)

    def const(self, base: str, value) -> str:
        t = self.ctx.initializer(f"{self.name}/emulate_{base}", np.asarray(value))
        self.inits.append(t)
        return t.name

    def __call__(self, op: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        out = out or self.ctx.fresh(f"{self.name}/emulate_{op.lower()}")
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.ctx.fresh(out), **attrs))
        return out

    def mean_abs(self, x: str, axes: list[int]) -> str:
        """ReduceMean(|x|) over `axes`, keepdims (axes an input from opset 18, an attribute before)."""
        if self.opset >= 18:
            return self("ReduceMean", [self("Abs", [x]), self.const("axes", np.array(axes, np.int64))])
        return self("ReduceMean", [self("Abs", [x])], axes=axes)

    def residual(self, x: str, levels: int, axes: list[int], plus: str, minus: str, zero: str):
        """The bit planes B_i and the means s_i of the residual binarization of x (kernels.reference)."""
        planes, scales, r = [], [], x
        for _ in range(levels):
            s = self.mean_abs(r, axes)
            b = self("Where", [self("Greater", [r, zero]), plus, minus])
            planes.append(b)
            scales.append(s)
            r = self("Sub", [r, self("Mul", [s, b])])
        return planes, scales


class MultibitToStandard(Rule):
    """MultibitConv in standard ops: the residual binarization of X (per sample) and of W (per output channel,
    at the stored scales α) written out, then Conv + bias. Training W and α through it needs a straight-through
    gradient, which standard ops do not give (Where has none): it is for inspection and other runtimes, and
    `lower` does not read it back."""

    def check(self, node, ctx):
        geometry = ctx.constant(node.input[4]) if len(node.input) == 5 else None
        return "geometry is not a constant" if geometry is None else geometry_problem(geometry[:11])

    def rewrite(self, node, ctx):
        name = ctx.name_of(node)
        x, w, alpha, bias, geometry = node.input
        geo = ctx.constant(geometry)
        g, levels_x, levels_w = Geometry.decode(geo[:11]), int(geo[11]), len(ctx.constant(alpha))
        e = _Emitter(ctx, name)
        plus, minus, zero = (e.const(k, np.array(v, np.float32)) for k, v in (("one", 1), ("minus_one", -1),
                                                                              ("zero", 0)))
        axes = list(range(1, g.spatial_rank + 2))
        w_planes, _ = e.residual(w, levels_w, axes, plus, minus, zero)
        shape = e.const("channel_shape", np.array([-1] + [1] * (g.spatial_rank + 1), np.int64))
        terms = [e("Mul", [p, e("Reshape", [e("Gather", [alpha, e.const("level", np.array(i, np.int64))], axis=0),
                                            shape])]) for i, p in enumerate(w_planes)]
        w_approx = terms[0] if len(terms) == 1 else e("Sum", terms)
        x_planes, x_scales = e.residual(x, levels_x, axes, plus, minus, zero)
        if levels_x == 1:
            x_approx = x_planes[0]
        else:
            parts = [e("Mul", [s, b]) for s, b in zip(x_scales, x_planes)]
            x_approx = e("Sum", parts)
        conv = e("Conv", [x_approx, w_approx], **g.conv_attributes())
        bias_shape = e.const("bias_shape", np.array([1, -1] + [1] * g.spatial_rank, np.int64))
        e.nodes.append(helper.make_node("Add", [conv, e("Reshape", [bias, bias_shape])], list(node.output),
                                        name=node.name or name, doc_string=MULTIBIT_MARKER))
        return Rewrite(nodes=e.nodes, initializers=e.inits, layer=_emulated_layer(name, node.op_type, ctx.constant(w)))


def rules() -> dict:
    return {(ops.DOMAIN, ops.BINARY_CONV): BinaryConvToStandard(),
            (ops.DOMAIN, ops.MULTIBIT_CONV): MultibitToStandard()}


def emulated_parts(node: onnx.NodeProto, producers: dict[str, onnx.NodeProto], constant) -> dict | None:
    """X, W, alpha, bias tensor names and the Conv node of an emulated BinaryConv ending in `node`, or None unless
    every node and constant of the pattern is as BinaryConvToStandard wrote it: the marker alone let an edited
    model (a flipped comparison, other Where values) lower to a different function (3.5% agreement)."""
    if node.op_type != "Add" or node.doc_string != MARKER:
        return None

    def made_by(tensor: str, op_type: str, inputs: int) -> onnx.NodeProto | None:
        found = producers.get(tensor)
        ok = found is not None and found.op_type == op_type and found.domain in ("", "ai.onnx") and \
            len(found.input) == inputs
        return found if ok else None

    def equals(tensor: str, value) -> bool:
        got = constant(tensor)
        return got is not None and np.array_equal(np.asarray(got).reshape(-1), np.asarray(value).reshape(-1))

    def sign_of(tensor: str) -> str | None:
        where = made_by(tensor, "Where", 3)
        gt = made_by(where.input[0], "Greater", 2) if where is not None else None
        ok = gt is not None and equals(where.input[1], 1) and equals(where.input[2], -1) and equals(gt.input[1], 0)
        return gt.input[0] if ok else None

    mul, bias_reshape = made_by(node.input[0], "Mul", 2), made_by(node.input[1], "Reshape", 2)
    conv = made_by(mul.input[0], "Conv", 2) if mul is not None else None
    alpha_reshape = made_by(mul.input[1], "Reshape", 2) if mul is not None else None
    if None in (bias_reshape, conv, alpha_reshape) or node_attributes(conv).get("group", 1) != 1:
        return None
    x, w = sign_of(conv.input[0]), sign_of(conv.input[1])
    w_value = constant(w) if w is not None else None
    if x is None or w_value is None:
        return None
    channel_shape = [1, -1] + [1] * (w_value.ndim - 2)  # α and bias along the output channels
    if not (equals(alpha_reshape.input[1], channel_shape) and equals(bias_reshape.input[1], channel_shape)):
        return None
    return {"x": x, "w": w, "alpha": alpha_reshape.input[0], "bias": bias_reshape.input[0], "conv": conv}


def _emulated_layer(name: str, op_type: str, weight: np.ndarray | None) -> LayerReport:
    """An emulated layer keeps its float weight in the file (standard ops read it): its size is that weight's."""
    size = 0 if weight is None else int(weight.size)
    return LayerReport(name=name, op_type=op_type, action="emulated", params_after=size, bytes_after=4 * size)
