"""Params and FLOPs: what every report and `inspect` count (weights as stored, FLOPs per sample from shape
inference and the weights; no pass's checks run here).
"""
from __future__ import annotations

import numpy as np
import onnx

from . import schemas as ops
from .context import GraphContext
from .nodes import op_key, subgraphs


def model_weights(model: onnx.ModelProto) -> tuple[int, int]:
    """(elements, bytes) of every constant: initializers and Constant nodes, subgraphs included."""
    elements = nbytes = 0
    tensors = list(model.graph.initializer)

    def constants(graph):
        for node in graph.node:
            tensors.extend(a.t for a in node.attribute if node.op_type == "Constant" and a.type == a.TENSOR)
            for sub in subgraphs(node):
                tensors.extend(sub.initializer)
                constants(sub)

    constants(model.graph)
    for t in tensors:
        n = int(np.prod(t.dims))
        elements += n
        nbytes += n * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    return elements, nbytes


def node_flops(node, w, ctx) -> int | None:
    """Multiply-adds x2 per sample; None when a size it needs is unknown (give --input-shape)."""
    if w is None:
        return None
    if ops.is_custom(node):  # 1-bit layers do XNOR/popcount, not float multiply-adds
        return 0
    if node.op_type == "Conv":
        spatial = (ctx.shape(node.output[0]) or [])[2:]
        if not spatial or not all(isinstance(d, int) for d in spatial):
            return None
        return int(2 * w.size * np.prod(spatial))
    shape = ctx.shape(node.input[0]) or []
    if node.op_type == "MatMul":
        inner = shape[1:-1]
        if not all(isinstance(d, int) for d in inner):
            return None
        return int(2 * w.size * np.prod(inner))
    return int(2 * w.size)


def stored_weight(node, ctx):
    """The layer's weight as stored: through a DequantizeLinear for a quantized layer (int8 in the file)."""
    if len(node.input) < 2:
        return None, ""
    producer = ctx.producers.get(node.input[1])
    if producer is not None and producer.op_type == "DequantizeLinear":
        return ctx.constant(producer.input[0]), "int8 (QDQ)"
    return ctx.constant(node.input[1]), ""


WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")


def model_flops(model: onnx.ModelProto, shapes: dict | None = None) -> tuple[int, int]:
    """(float FLOPs per sample of the Conv/Gemm/MatMul layers whose sizes are known, layers whose sizes are not);
    every report has it, so no pass's checks run here: only shape inference and the weights."""
    ctx = GraphContext(model, shapes)
    weighted_keys = {("", op) for op in WEIGHTED_OPS}
    weighted = [(n, stored_weight(n, ctx)[0]) for n in model.graph.node if op_key(n) in weighted_keys]
    flops = [node_flops(n, w, ctx) for n, w in weighted if w is not None]  # X·Y of two activations: not a layer
    return sum(f or 0 for f in flops), sum(f is None for f in flops)
