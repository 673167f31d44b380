"""`onnxopt inspect`: every layer the passes' registries know, what each pass can do with it, and the model's
totals. Read from the same registries the passes use, so `inspect` and the commands cannot disagree.
"""
from __future__ import annotations

import onnx

from ..graph import schemas as ops
from ..graph.context import GraphContext
from ..graph.flops import model_weights, node_flops, stored_weight
from ..graph.nodes import op_key, subgraphs
from ..graph.selection import module_path
from ..passes.binarize import conv as binarize_pass
from ..passes.binarize.options import BinarizeOptions
from ..passes.factor import dense as factor_pass
from ..passes.factor.options import FactorOptions

INT8_OPS = ("MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul")


def _conv_modes(node, w) -> list[str]:
    """The conv factoring modes that apply to this conv (a 1-D conv: channel only; spatial needs a kernel above
    1x1 and explicit pads)."""
    if w.ndim == 3:
        return ["channel"]
    auto_pad = next((a.s for a in node.attribute if a.name == "auto_pad"), b"NOTSET")
    spatial = w.shape[2] * w.shape[3] > 1 and auto_pad in (b"NOTSET", b"")
    return ["channel", "tucker"] + (["spatial"] if spatial else [])


def _custom_kind(node, ctx) -> str:
    """What a com.onnxopt layer is: 1-bit or its levels (weights x activations), trainable or lowered."""
    form = "lowered" if node.op_type in ops.PACKED else "trainable"
    bits = "1-bit"
    if node.op_type in (ops.MULTIBIT_CONV, ops.MULTIBIT_BIT_CONV):
        alpha, geometry = ctx.constant(node.input[2]), ctx.constant(node.input[4])
        if alpha is not None and geometry is not None and alpha.ndim == 2 and len(geometry) == 12:
            bits = f"{len(alpha)}x{int(geometry[11])}-bit"
    return f"{bits}, {form} ({node.op_type})"


def inspect_model(source: onnx.ModelProto, shapes: dict | None = None) -> dict:
    ctx = GraphContext(source, shapes)
    # a rule's check does not depend on its options (rank, scale): any valid options give the same verdicts
    passes = {"factor": factor_pass.rules(FactorOptions(rank="0.5")),
              "binarize": binarize_pass.rules(BinarizeOptions())}
    layers = []
    for node in source.graph.node:
        key = op_key(node)
        custom = ops.is_custom(node)
        if not (custom or node.op_type in INT8_OPS or any(key in rules for rules in passes.values())):
            continue
        w, stored = stored_weight(node, ctx)
        row = {"name": ctx.name_of(node), "module": module_path(node), "op_type": node.op_type,
               "weight_shape": "x".join(map(str, w.shape)) if w is not None else None,
               "params": int(w.size) if w is not None else None, "flops": node_flops(node, w, ctx), "stored": stored}
        for pass_name, rules in passes.items():
            rule = rules.get(key)
            reason = rule.check(node, ctx) if rule else "not handled by this pass"
            row[pass_name] = "yes" if reason is None else f"no: {reason}"
        if node.op_type == "Conv" and row["factor"] == "yes" and w is not None:
            row["factor"] = f"yes: {'/'.join(_conv_modes(node, w))}"
        if custom or node.op_type in INT8_OPS or stored:
            done = _custom_kind(node, ctx) if custom else "int8"
            row.update(factor=f"no: already {done}", binarize=f"no: already {done}", stored=done)
        layers.append(row)
    layers += _subgraph_layers(source, passes)
    elements, nbytes = model_weights(source)
    unknown = sum(r["flops"] is None and r["params"] is not None for r in layers)
    return {"layers": layers,
            "totals": {"layers": len(layers), "params": elements, "weight_bytes": nbytes,
                       "model_bytes": source.ByteSize(),
                       "flops": sum(r["flops"] or 0 for r in layers), "flops_unknown_layers": unknown},
            "notes": ([f"FLOPs of {unknown} layers are unknown (symbolic sizes): give --input-shape "
                       "NAME:D1,D2,..."] if unknown else [])}


def _subgraph_layers(source, passes) -> list[dict]:
    """Layers inside If/Loop/Scan bodies: listed, marked, never rewritten."""
    rows = []
    for node in source.graph.node:
        for sub in subgraphs(node):
            for inner in sub.node:
                if any(op_key(inner) in rules for rules in passes.values()):
                    where = f"no: inside the body of {node.op_type} '{node.name}'"
                    rows.append({"name": inner.name or inner.op_type, "op_type": inner.op_type,
                                 "weight_shape": None, "params": None, "flops": None,
                                 "stored": f"in {node.op_type} body", "factor": where, "binarize": where})
    return rows
