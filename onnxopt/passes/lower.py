"""lower: com.onnxopt BinaryConv → BitConv, the native bit-packed convolution.

The float weights become their sign bits, 64 input channels to a uint64 word, laid out
[kh, kw, word, out_channel] for the kernel (32× smaller than float32 when C is a multiple of 64).
α, bias and geometry are carried over unchanged, so BitConv computes exactly what BinaryConv did.
"""
from __future__ import annotations

import onnx
from onnx import helper

from ..kernels.packing import pack_weights
from ..model import CUSTOM_DOMAIN
from ..report import LayerReport
from . import GraphContext, Rewrite


class BinaryConvRule:
    def check(self, node: onnx.NodeProto, ctx: GraphContext) -> str | None:
        if len(node.input) != 5:
            return f"BinaryConv with {len(node.input)} inputs, expected 5"
        for role, tensor in zip(("weight", "alpha", "bias", "geometry"), node.input[1:]):
            if ctx.constant(tensor) is None:
                return f"{role} '{tensor}' is not a constant"
        return None

    def rewrite(self, node: onnx.NodeProto, ctx: GraphContext) -> Rewrite:
        name = ctx.name_of(node)
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


RULES = {(CUSTOM_DOMAIN, "BinaryConv"): BinaryConvRule()}
