"""binarize: Conv → com.onnxopt BinaryConv, the trainable binarized convolution.

BinaryConv computes Conv(b(X), α ⊙ b(W)) + B with b(v) = +1 if v > 0 else −1, zero padding, and one
α per output channel (mean |W| over that channel's weights by default, the L1-optimal scale).
The float weights stay in the model as they were, so it can still be trained; `lower` packs them.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ...graph import schemas as ops
from ...graph.context import GraphContext
from ...graph.nodes import node_attributes as _attrs
from ...graph.selection import layer_paths, matches
from ...kernels.geometry import Geometry
from ...kernels.reference import residual_planes
from ...report import LayerReport
from ..rules import Rewrite, Rule, constant_weight
from .options import BinarizeOptions


def scale_for(w: np.ndarray, scale: str) -> np.ndarray:
    """α per output channel: mean |W| per channel, one mean for the tensor, or 1."""
    o = w.shape[0]
    if scale == "channel":
        return np.abs(w).reshape(o, -1).mean(axis=1).astype(np.float32)
    if scale == "tensor":
        return np.full(o, np.abs(w).mean(), np.float32)
    return np.ones(o, np.float32)


class ConvRule(Rule):
    def __init__(self, options: BinarizeOptions):
        self.options = options

    def check(self, node: onnx.NodeProto, ctx: GraphContext) -> str | None:
        w, reason = constant_weight(node, ctx, float32=True)
        if reason:
            return reason
        if w.ndim not in (3, 4):
            return f"{w.ndim - 2}-D convolution: only Conv1d and Conv2d are binarized"
        group = _attrs(node).get("group", 1)
        if group != 1:
            kind = "depthwise" if group == w.shape[0] else "grouped"
            return f"{kind} convolution (group={group}) is not binarized"
        if len(node.input) > 2 and node.input[2] and ctx.constant(node.input[2]) is None:
            return f"bias '{node.input[2]}' is not a constant"
        shape = ctx.shape(node.input[0])
        if shape is not None and len(shape) != w.ndim:
            return f"input rank {len(shape)} does not match a {w.ndim}-D weight"
        return None

    def rewrite(self, node: onnx.NodeProto, ctx: GraphContext) -> Rewrite:
        name = ctx.name_of(node)
        w = ctx.constant(node.input[1])
        o = w.shape[0]
        bias = ctx.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(o, np.float32)
        geometry = Geometry.from_conv(_attrs(node), spatial_rank=w.ndim - 2, channels=w.shape[1]).encode()
        paths = layer_paths(node)
        kw, ka = next((b for p, b in self.options.bits_overrides if matches(name, p, paths)), self.options.bits)
        op_type = ops.BINARY_CONV
        scales = scale_for(w, self.options.scale)
        if (kw, ka) != (1, 1):  # residual levels: the per-channel means of each residual are the initial scales
            op_type, scales = ops.MULTIBIT_CONV, residual_planes(w, kw)[1].astype(np.float32)
            geometry = np.append(geometry, ka).astype(np.int64)
        alpha = ctx.initializer(f"{name}/binary_alpha", scales)
        b = ctx.initializer(f"{name}/binary_bias", bias.astype(np.float32).reshape(o))
        geo = ctx.initializer(f"{name}/binary_geometry", geometry)
        new = helper.make_node(op_type, [node.input[0], node.input[1], alpha.name, b.name, geo.name],
                               list(node.output), name=node.name or ctx.fresh(name), domain=ops.DOMAIN)
        warnings = []
        if node.input[0] in {i.name for i in ctx.model.graph.input}:
            warnings.append(f"{name} reads graph input '{node.input[0]}' directly: binarizing raw inputs loses "
                            f"most of their information (keep it float with --skip)")
        nbytes = w.size * 4
        action = "binarized" if (kw, ka) == (1, 1) else f"binarized {kw}x{ka} bits"
        layer = LayerReport(name=name, op_type="Conv", shape="x".join(map(str, w.shape)), action=action,
                            params_before=int(w.size), params_after=int(w.size), bytes_before=nbytes,
                            bytes_after=nbytes)
        return Rewrite(nodes=[new], initializers=[alpha, b, geo], layer=layer, warnings=warnings,
                       opsets={ops.DOMAIN: ops.OPSET})


def rules(options: BinarizeOptions) -> dict:
    return {("", "Conv"): ConvRule(options)}
