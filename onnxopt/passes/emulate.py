"""emulate: BinaryConv → standard ONNX ops, so external trainers (onnx2torch, ...) can read the model.

    y = Conv(Where(X > 0, 1, −1), Where(W > 0, 1, −1)) · α + B

The float latent weights W stay an initializer. The last node (Add) keeps the BinaryConv's name and
is marked in its doc_string, which is how `lower` finds the pattern again (EmulatedRule in lower.py).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .. import ops
from ..convgeom import Geometry, geometry_problem
from ..report import LayerReport
from . import GraphContext, Rewrite, Rule

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
        layer = LayerReport(name=name, op_type="BinaryConv", action="emulated")
        return Rewrite(nodes=nodes, initializers=[ones, minus, zero, shape], layer=layer)


def rules() -> dict:
    return {(ops.DOMAIN, ops.BINARY_CONV): BinaryConvToStandard()}


def emulated_parts(node: onnx.NodeProto, producers: dict[str, onnx.NodeProto]) -> dict | None:
    """X, W, alpha, bias tensor names and the Conv node of an emulated BinaryConv ending in `node`."""
    if node.op_type != "Add" or node.doc_string != MARKER:
        return None
    try:
        mul, bias_reshape = producers[node.input[0]], producers[node.input[1]]
        conv, alpha_reshape = producers[mul.input[0]], producers[mul.input[1]]
        x_where, w_where = producers[conv.input[0]], producers[conv.input[1]]
        x_gt, w_gt = producers[x_where.input[0]], producers[w_where.input[0]]
    except KeyError:
        return None
    return {"x": x_gt.input[0], "w": w_gt.input[0], "alpha": alpha_reshape.input[0], "bias": bias_reshape.input[0],
            "conv": conv}
