"""factor: Gemm, and MatMul with a constant 2-D weight, → two MatMuls of rank k (Conv: conv.py).

Gemm computes Y = α·A'·B' + β·C (A' = Aᵀ if transA, B' = Bᵀ if transB). With W = α·B' (m×n)
and W ≈ U·V (U m×k, V k×n): Y ≈ (A'·U)·V + β·C, costing k(m+n) instead of m·n multiply-adds
per row. MatMul X·W is the same without α, β, C. A layer where k(m+n) ≥ m·n is left alone.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ...graph.context import GraphContext
from ...graph.nodes import node_attributes as _attrs
from ...graph.selection import layer_paths
from ...report import LayerReport
from ..rules import FLOAT_TYPES, Declined, Rewrite, constant_weight
from . import conv as factor_conv
from . import linalg
from .lowrank import LowRankRule, large_error_warning
from .options import FactorOptions


def _rows(ctx: GraphContext, tensor: str) -> int:
    """Rows a MatMul pushes through its weight per sample: the input's dims between batch and last."""
    shape = ctx.shape(tensor)
    if not shape or len(shape) < 3:
        return 1
    return int(np.prod([d if isinstance(d, int) else 1 for d in shape[1:-1]]))


class _DenseRule(LowRankRule):
    """What Gemm and MatMul share: the checks and the two-MatMul replacement."""

    def check(self, node: onnx.NodeProto, ctx: GraphContext) -> str | None:
        w, reason = constant_weight(node, ctx, self.weight_input)
        if reason:
            return reason
        if w.ndim != 2:
            return f"weight is {w.ndim}-D, only 2-D weights are factored"
        if min(w.shape) < 2:
            return f"weight {w.shape[0]}x{w.shape[1]} has rank 1 at most"
        return None

    def replace(self, node, ctx, x: str, *, pre_nodes=(), bias_nodes=(), bias_inits=()) -> Rewrite:
        """x → [pre_nodes] → MatMul(U) → MatMul(V) → [bias_nodes, whose first input "" is the product]."""
        name = ctx.name_of(node)
        w = self.weight(node, ctx)
        extra_params, rows = self.bias_size(node, ctx), self.rows(node, ctx)
        m, n = w.shape
        k = self.choose_rank(name, w, layer_paths(node), key=ctx.layer_id(node))
        if k * (m + n) >= m * n and not self.options.allow_growth:
            raise Declined(f"rank {k} gains nothing: k(m+n) = {k * (m + n):,} >= m*n = {m * n:,}")
        f = self.factors(name, w, k, key=ctx.layer_id(node))
        u = ctx.initializer(f"{name}/factor_U", f.u.astype(w.dtype))
        v = ctx.initializer(f"{name}/factor_V", f.v.astype(w.dtype))
        hidden = ctx.fresh(f"{name}/factor_hidden")
        out = node.output[0]
        product = ctx.fresh(f"{name}/factor_out") if bias_nodes else out
        nodes = [helper.make_node("MatMul", [x, u.name], [hidden], name=ctx.fresh(f"{name}/factor_MatMul_U")),
                 helper.make_node("MatMul", [hidden, v.name], [product], name=ctx.fresh(f"{name}/factor_MatMul_V"))]
        for b in bias_nodes:
            if b.input[0] == "":
                b.input[0] = product
        nodes = list(pre_nodes) + nodes + list(bias_nodes)
        layer = LayerReport(name=name, op_type=node.op_type, shape=f"{m}x{n}", action="factored", rank=k,
                            full_rank=min(m, n),
                            params_before=m * n + extra_params, params_after=k * (m + n) + extra_params,
                            flops_before=2 * m * n * rows, flops_after=2 * k * (m + n) * rows, error=f.error)
        return Rewrite(nodes=nodes, initializers=[u, v] + list(bias_inits), layer=layer,
                       warnings=large_error_warning(layer))


def _input_mismatch(ctx: GraphContext, tensor: str, axis: int, rows: int) -> str | None:
    """Why the input cannot feed an m-row weight, when shape inference knows its inner dimension."""
    shape = ctx.shape(tensor)
    if not shape or len(shape) < 2 or not isinstance(shape[axis], int):
        return None
    if shape[axis] != rows:
        return f"input '{tensor}' has {shape[axis]} features, the weight expects {rows}: the model cannot run"
    return None


class GemmRule(_DenseRule):
    def calibration_rows(self, node, x):
        return x.T if _attrs(node).get("transA", 0) else x

    def weight(self, node, ctx):
        a = _attrs(node)
        b = ctx.constant(node.input[1])
        return (b.T if a.get("transB", 0) else b) * np.asarray(a.get("alpha", 1.0), b.dtype)

    def bias_size(self, node, ctx):
        c = ctx.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        return int(c.size) if c is not None and float(_attrs(node).get("beta", 1.0)) != 0 else 0

    def check(self, node, ctx):
        reason = super().check(node, ctx)
        if reason:
            return reason
        a = _attrs(node)
        b = ctx.constant(node.input[1])
        reason = _input_mismatch(ctx, node.input[0], 0 if a.get("transA", 0) else -1,
                                 b.shape[1] if a.get("transB", 0) else b.shape[0])
        if reason:
            return reason
        if a.get("beta", 1.0) != 0 and len(node.input) > 2 and node.input[2]:
            c = ctx.constant(node.input[2])
            if c is not None and c.dtype.type not in FLOAT_TYPES:
                return f"bias dtype {c.dtype} is not floating point"
        return None

    def rewrite(self, node, ctx):
        a = _attrs(node)
        name = ctx.name_of(node)
        w = self.weight(node, ctx)
        pre_nodes = []
        x = node.input[0]
        if a.get("transA", 0):
            xt = ctx.fresh(f"{name}/factor_At")
            pre_nodes = [helper.make_node("Transpose", [x], [xt], name=ctx.fresh(f"{name}/factor_Transpose"),
                                               perm=[1, 0])]
            x = xt
        bias_nodes, bias_inits = [], []
        beta = float(a.get("beta", 1.0))
        c_name = node.input[2] if len(node.input) > 2 else ""
        if c_name and beta != 0:
            c = ctx.constant(c_name)
            if c is not None:
                init = ctx.initializer(f"{name}/factor_bias", (c * np.asarray(beta, c.dtype)).astype(w.dtype))
                bias_inits.append(init)
                bias_nodes.append(helper.make_node("Add", ["", init.name], [node.output[0]],
                                                   name=ctx.fresh(f"{name}/factor_Add")))
            else:
                term = c_name
                if beta != 1:
                    scale = ctx.initializer(f"{name}/factor_beta", np.asarray(beta, w.dtype))
                    bias_inits.append(scale)
                    term = ctx.fresh(f"{name}/factor_beta_C")
                    bias_nodes.append(helper.make_node("Mul", [c_name, scale.name], [term],
                                                       name=ctx.fresh(f"{name}/factor_Mul")))
                bias_nodes.append(helper.make_node("Add", ["", term], [node.output[0]],
                                                   name=ctx.fresh(f"{name}/factor_Add")))
        return self.replace(node, ctx, x, pre_nodes=pre_nodes, bias_nodes=bias_nodes, bias_inits=bias_inits)


class MatMulRule(_DenseRule):
    def check(self, node, ctx):
        if len(node.input) == 2 and ctx.constant(node.input[0]) is not None and ctx.constant(node.input[1]) is None:
            return "the constant is the first input (W·X); only X·W is factored"
        return super().check(node, ctx) or _input_mismatch(ctx, node.input[0], -1, ctx.constant(node.input[1]).shape[0])

    def rows(self, node, ctx):
        return _rows(ctx, node.input[0])

    def rewrite(self, node, ctx):
        return self.replace(node, ctx, node.input[0])


def rules(options: FactorOptions, whitening: dict[str, np.ndarray] | None = None, *,
          ranks: dict[str, int | None] | None = None, spectra: dict[str, linalg.Spectrum] | None = None) -> dict:
    return {("", "Gemm"): GemmRule(options, whitening, ranks, spectra),
            ("", "MatMul"): MatMulRule(options, whitening, ranks, spectra),
            **factor_conv.rules(options, whitening, ranks, spectra)}
