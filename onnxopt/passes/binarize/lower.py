"""lower: com.onnxopt BinaryConv (or its `--emulate` standard-ops form) → BitConv, the native bit-packed conv.

The float weights become their sign bits, 64 input channels to a uint64 word, laid out
[kh, kw, word, out_channel] for the kernel (32× smaller than float32 when C is a multiple of 64).
α, bias and geometry are carried over unchanged, so BitConv computes exactly what BinaryConv did.
Constants that a kernel could not index safely are refused here (`ops.constants_problem`).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ...errors import OnnxoptError
from ...graph import schemas as ops
from ...graph.context import GraphContext
from ...graph.nodes import node_attributes
from ...kernels.geometry import Geometry
from ...kernels.packing import pack_weights
from ...report import LayerReport
from ..rules import Rewrite, Rule
from .emulate import MARKER, emulated_parts


def _checked(name: str, w, alpha, bias, geometry, op_type: str = ops.BINARY_CONV) -> None:
    problem = ops.constants_problem(op_type, w, alpha, bias, geometry)
    if problem:
        raise OnnxoptError(f"cannot lower '{name}': {problem}")


class BinaryConvRule(Rule):
    def check(self, node: onnx.NodeProto, ctx: GraphContext) -> str | None:
        if len(node.input) != 5:
            return f"BinaryConv with {len(node.input)} inputs, expected 5"
        for role, tensor in zip(("weight", "alpha", "bias", "geometry"), node.input[1:]):
            if ctx.constant(tensor) is None:
                return f"{role} '{tensor}' is not a constant"
        return None

    def rewrite(self, node: onnx.NodeProto, ctx: GraphContext) -> Rewrite:
        name = ctx.name_of(node)
        _checked(name, *(ctx.constant(t) for t in node.input[1:]), op_type=node.op_type)
        return to_multibit(node, name, ctx) if node.op_type == ops.MULTIBIT_CONV else to_bitconv(node, name, ctx)


def to_multibit(node: onnx.NodeProto, name: str, ctx: GraphContext) -> Rewrite:
    """MultibitConv → MultibitBitConv: the Kw bit planes of the residual binarization of W, each packed as the
    1-bit kernel packs a weight, side by side along the output channels (Kw bits per weight)."""
    from ...kernels.reference import residual_planes

    w, alpha = ctx.constant(node.input[1]), ctx.constant(node.input[2])
    planes, _ = residual_planes(w[:, :, None, :] if w.ndim == 3 else w, len(alpha))
    bits = np.concatenate([pack_weights(p) for p in planes], axis=3)
    packed = ctx.initializer(f"{name}/bit_weights", bits)
    new = helper.make_node(ops.MULTIBIT_BIT_CONV, [node.input[0], packed.name, *node.input[2:]], list(node.output),
                           name=node.name or ctx.fresh(name), domain=ops.DOMAIN)
    layer = LayerReport(name=name, op_type=node.op_type, shape="x".join(map(str, w.shape)), action="lowered",
                        params_before=int(w.size), params_after=int(w.size), bytes_before=int(w.size) * 4,
                        bytes_after=int(bits.nbytes))
    return Rewrite(nodes=[new], initializers=[packed], layer=layer, opsets={ops.DOMAIN: ops.OPSET})


def to_bitconv(node: onnx.NodeProto, name: str, ctx: GraphContext) -> Rewrite:
    w = ctx.constant(node.input[1])
    w4 = w[:, :, None, :] if w.ndim == 3 else w
    bits = pack_weights(w4)
    packed = ctx.initializer(f"{name}/bit_weights", bits)
    new = helper.make_node(ops.BIT_CONV, [node.input[0], packed.name, *node.input[2:]], list(node.output),
                           name=node.name or ctx.fresh(name), domain=ops.DOMAIN)
    layer = LayerReport(name=name, op_type="BinaryConv", shape="x".join(map(str, w.shape)), action="lowered",
                        params_before=int(w.size), params_after=int(w.size), bytes_before=int(w.size) * 4,
                        bytes_after=int(bits.nbytes))
    return Rewrite(nodes=[new], initializers=[packed], layer=layer, opsets={ops.DOMAIN: ops.OPSET})


def _per_channel(values: np.ndarray, channels: int) -> np.ndarray:
    """α or bias as float32 [O]: the emulated form may hold one value for all channels (it broadcasts
    there), the kernel reads one per channel."""
    flat = values.astype(np.float32).reshape(-1)
    return np.full(channels, flat[0], np.float32) if flat.size == 1 else flat


class EmulatedRule(Rule):
    """The `binarize --emulate` form (standard ops ending in a marked Add) → BitConv."""

    def applies(self, node, ctx) -> bool:
        return node.doc_string == MARKER  # plain Adds are not candidates at all

    def check(self, node, ctx):
        parts = emulated_parts(node, ctx.producers, ctx.constant)
        if parts is None:
            return "marked as emulated BinaryConv, but the pattern before it was changed"
        if any(ctx.constant(parts[role]) is None for role in ("w", "alpha", "bias")):
            return "emulated BinaryConv whose weight, alpha or bias is not a constant"
        return None

    def rewrite(self, node, ctx):
        parts = emulated_parts(node, ctx.producers, ctx.constant)
        w = ctx.constant(parts["w"])
        name = ctx.name_of(node)
        if w.ndim not in (3, 4):
            raise OnnxoptError(f"cannot lower '{name}': weight of shape {list(w.shape)} is not a 1-D or 2-D conv")
        geometry = Geometry.from_conv(node_attributes(parts["conv"]), spatial_rank=w.ndim - 2,
                                      channels=w.shape[1]).encode()
        alpha = _per_channel(ctx.constant(parts["alpha"]), w.shape[0])
        bias = _per_channel(ctx.constant(parts["bias"]), w.shape[0])
        _checked(name, w, alpha, bias, geometry)
        geo = ctx.initializer(f"{name}/binary_geometry", geometry)
        alpha_init = ctx.initializer(f"{name}/binary_alpha", alpha)
        bias_init = ctx.initializer(f"{name}/binary_bias", bias)
        binary = helper.make_node(ops.BINARY_CONV, [parts["x"], parts["w"], alpha_init.name, bias_init.name,
                                                    geo.name], list(node.output), name=node.name, domain=ops.DOMAIN)
        lowered = to_bitconv(binary, name, ctx)
        lowered.initializers += [geo, alpha_init, bias_init]
        return lowered


def rules() -> dict:
    return {(ops.DOMAIN, ops.BINARY_CONV): BinaryConvRule(), (ops.DOMAIN, ops.MULTIBIT_CONV): BinaryConvRule(),
            ("", "Add"): EmulatedRule()}
