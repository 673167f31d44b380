"""fold: a BatchNormalization right after a BitConv (or MultibitBitConv: every level's α) becomes part of its α and
bias.

BN(y) = (y − mean)·s + B with s = scale / √(var + ε), and BitConv's y = α·Σ + bias, so
BN(y) = (α·s)·Σ + ((bias − mean)·s + B): one node instead of two, and no pass over the output.
The folded constants are computed in float64 and rounded once to float32, so the result differs
from BitConv followed by BatchNormalization only by float32 rounding (a few ulps of the output).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ...graph import schemas as ops
from ...graph.context import GraphContext
from ...graph.nodes import subgraphs
from ...report import LayerReport
from ..rules import Declined, Rewrite, Rule


def _readers(graph: onnx.GraphProto, tensor: str) -> int:
    """How many node inputs read `tensor`, in subgraphs too."""
    return sum(list(n.input).count(tensor) + sum(_readers(sub, tensor) for sub in subgraphs(n)) for n in graph.node)


class BatchNormRule(Rule):
    def applies(self, node: onnx.NodeProto, ctx: GraphContext) -> bool:
        producer = ctx.producers.get(node.input[0])
        return producer is not None and ops.is_custom(producer) and producer.op_type in ops.PACKED

    def check(self, node: onnx.NodeProto, ctx: GraphContext) -> str | None:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("training_mode", 0) or len([o for o in node.output if o]) != 1:
            return "BatchNormalization in training mode"
        conv = ctx.producers[node.input[0]]
        graph = ctx.model.graph
        if node.input[0] in {o.name for o in graph.output} or _readers(graph, node.input[0]) != 1:
            return "the BitConv output is also read elsewhere"
        for role, tensor in zip(("scale", "B", "mean", "var"), node.input[1:5]):
            if ctx.constant(tensor) is None:
                return f"BatchNormalization {role} '{tensor}' is not a constant"
        if ctx.constant(conv.input[2]) is None or ctx.constant(conv.input[3]) is None:
            return "BitConv alpha or bias is not a constant"
        return None

    def rewrite(self, node: onnx.NodeProto, ctx: GraphContext) -> Rewrite:
        conv = ctx.producers[node.input[0]]
        epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        scale, shift, mean, var = (ctx.constant(t).astype(np.float64).reshape(-1) for t in node.input[1:5])
        alpha = ctx.constant(conv.input[2]).astype(np.float64)  # [O], or [levels, O] for a multi-bit layer
        bias = ctx.constant(conv.input[3]).astype(np.float64).reshape(-1)
        with np.errstate(all="ignore"):
            s = scale / np.sqrt(var + epsilon)
            folded_alpha, folded_bias = alpha * s, (bias - mean) * s + shift
        if not np.isfinite(np.concatenate([folded_alpha.reshape(-1), folded_bias]).astype(np.float32)).all():
            raise Declined("folding would give BitConv non-finite alpha or bias")
        name = ctx.name_of(conv)
        new_alpha = ctx.initializer(f"{name}/folded_alpha", folded_alpha.astype(np.float32))
        new_bias = ctx.initializer(f"{name}/folded_bias", folded_bias.astype(np.float32))
        folded = helper.make_node(conv.op_type, [conv.input[0], conv.input[1], new_alpha.name, new_bias.name,
                                              conv.input[4]], [node.output[0]], name=conv.name, domain=ops.DOMAIN)
        layer = LayerReport(name=ctx.name_of(node), op_type=node.op_type, shape=str(len(s)), action="folded",
                            reason=f"into BitConv '{name}'")
        return Rewrite(nodes=[folded], initializers=[new_alpha, new_bias], layer=layer)


def rules() -> dict:
    return {("", "BatchNormalization"): BatchNormRule()}
