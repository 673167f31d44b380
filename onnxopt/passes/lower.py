"""lower: com.onnxopt BinaryConv → BitConv, the native bit-packed convolution.

The float weights become their sign bits, 64 input channels to a uint64 word, laid out
[kh, kw, word, out_channel] for the kernel (32× smaller than float32 when C is a multiple of 64).
α, bias and geometry are carried over unchanged, so BitConv computes exactly what BinaryConv did.
"""
from __future__ import annotations

import onnx
import numpy as np
from onnx import helper

from ..convgeom import Geometry

from ..kernels.packing import pack_weights
from ..model import CUSTOM_DOMAIN
from ..report import LayerReport
from . import GraphContext, Rewrite
from .emulate import MARKER, emulated_parts


class BinaryConvRule:
    def check(self, node: onnx.NodeProto, ctx: GraphContext) -> str | None:
        if len(node.input) != 5:
            return f"BinaryConv with {len(node.input)} inputs, expected 5"
        for role, tensor in zip(("weight", "alpha", "bias", "geometry"), node.input[1:]):
            if ctx.constant(tensor) is None:
                return f"{role} '{tensor}' is not a constant"
        return None

    def rewrite(self, node: onnx.NodeProto, ctx: GraphContext) -> Rewrite:
        return to_bitconv(node, ctx.name_of(node), ctx)


def to_bitconv(node: onnx.NodeProto, name: str, ctx: GraphContext) -> Rewrite:
    w = ctx.constant(node.input[1])
    w4 = w[:, :, None, :] if w.ndim == 3 else w
    bits = pack_weights(w4)
    packed = ctx.initializer(f"{name}/bit_weights", bits)
    new = helper.make_node("BitConv", [node.input[0], packed.name, *node.input[2:]], list(node.output),
                           name=node.name or ctx.fresh(name), domain=CUSTOM_DOMAIN)
    layer = LayerReport(name=name, op_type="BinaryConv", shape="x".join(map(str, w.shape)), action="lowered",
                        params_before=int(w.size), params_after=int(w.size), bytes_before=int(w.size) * 4,
                        bytes_after=int(bits.nbytes))
    return Rewrite(nodes=[new], initializers=[packed], layer=layer)


class EmulatedRule:
    """The `binarize --emulate` form (standard ops ending in a marked Add) → BitConv."""

    def applies(self, node, ctx) -> bool:
        return node.doc_string == MARKER  # plain Adds are not candidates at all

    def check(self, node, ctx):
        parts = emulated_parts(node, ctx.producers)
        if parts is None:
            return "marked as emulated BinaryConv, but the pattern before it was changed"
        if ctx.constant(parts["w"]) is None or ctx.constant(parts["alpha"]) is None or \
                ctx.constant(parts["bias"]) is None:
            return "emulated BinaryConv whose weight, alpha or bias is not a constant"
        return None

    def rewrite(self, node, ctx):
        parts = emulated_parts(node, ctx.producers)
        w = ctx.constant(parts["w"])
        attrs = {a.name: helper.get_attribute_value(a) for a in parts["conv"].attribute}
        geometry = Geometry.from_conv(attrs, spatial_rank=w.ndim - 2, channels=w.shape[1])
        name = ctx.name_of(node)
        geo = ctx.initializer(f"{name}/binary_geometry", geometry.encode())
        alpha = ctx.initializer(f"{name}/binary_alpha", ctx.constant(parts["alpha"]).astype(np.float32).reshape(-1))
        bias = ctx.initializer(f"{name}/binary_bias", ctx.constant(parts["bias"]).astype(np.float32).reshape(-1))
        binary = helper.make_node("BinaryConv", [parts["x"], parts["w"], alpha.name, bias.name, geo.name],
                                  list(node.output), name=node.name, domain=CUSTOM_DOMAIN)
        lowered = to_bitconv(binary, name, ctx)
        lowered.initializers += [geo, alpha, bias]
        return lowered


RULES = {(CUSTOM_DOMAIN, "BinaryConv"): BinaryConvRule(), ("", "Add"): EmulatedRule()}
