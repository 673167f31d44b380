"""unbinarize: com.onnxopt BinaryConv → the float Conv it stands for, Conv(X, W) + bias.

The latent float weights are still in the model, so the float twin is exact. Calibration uses it as
the reference whose layer outputs the binarized layers are refit to.
"""
from __future__ import annotations

import onnx
from onnx import helper

from ...graph import schemas as ops
from ...graph.context import GraphContext
from ...kernels.geometry import Geometry, geometry_problem
from ...report import LayerReport
from ..rules import Rewrite, Rule


class BinaryConvToFloat(Rule):
    def check(self, node: onnx.NodeProto, ctx: GraphContext) -> str | None:
        geometry = ctx.constant(node.input[4]) if len(node.input) == 5 else None
        if geometry is None:
            return "geometry is not a constant"
        return geometry_problem(geometry[:11])  # a multi-bit op's geometry ends with its activation levels

    def rewrite(self, node: onnx.NodeProto, ctx: GraphContext) -> Rewrite:
        g = Geometry.decode(ctx.constant(node.input[4])[:11])
        conv = helper.make_node("Conv", [node.input[0], node.input[1], node.input[3]], list(node.output),
                                name=node.name, **g.conv_attributes())
        return Rewrite(nodes=[conv], initializers=[], layer=LayerReport(name=ctx.name_of(node), op_type=node.op_type,
                                                                        action="unbinarized"))


def rules() -> dict:
    return {(ops.DOMAIN, ops.BINARY_CONV): BinaryConvToFloat(), (ops.DOMAIN, ops.MULTIBIT_CONV): BinaryConvToFloat()}
