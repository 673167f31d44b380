"""The rule driver. A rule is built from its options and has `applies(node, ctx)` (is this node a candidate at
all), `check(node, ctx) -> reason | None` (why it declines) and `rewrite(node, ctx) -> Rewrite` (new nodes,
initializers and opset imports, never touching the graph itself). `apply_rules` is the one driver: it selects,
asks each rule, splices the results in, and drops what nothing reads any more.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
import onnx

from ..graph.context import GraphContext
from ..graph.nodes import copy_model, node_key, op_key, remove_unused, subgraphs, unique_node_names
from ..graph.selection import Selection, layer_paths
from ..report import LayerReport, Report

Progress = Callable[[list, str], Iterable]


class Declined(Exception):
    """Raised by a rewrite that finds, once it has computed, that it should leave the node alone."""


@dataclass
class Rewrite:
    nodes: list[onnx.NodeProto]
    initializers: list[onnx.TensorProto]
    layer: LayerReport
    warnings: list[str] = field(default_factory=list)
    opsets: dict[str, int] = field(default_factory=dict)  # opset imports the new nodes need


class Rule:
    """Base of every rule: a candidate unless `applies` says otherwise."""

    def applies(self, node: onnx.NodeProto, ctx: "GraphContext") -> bool:
        return True

    def check(self, node: onnx.NodeProto, ctx: "GraphContext") -> str | None:
        raise NotImplementedError

    def rewrite(self, node: onnx.NodeProto, ctx: "GraphContext") -> Rewrite:
        raise NotImplementedError


Rules = dict[tuple[str, str], Rule]




def candidate_layers(model: onnx.ModelProto, rules: Rules) -> list[tuple[str, tuple[str, ...]]]:
    """(name, module paths) of the main-graph nodes a pass could touch, as reports and patterns see them."""
    g = model.graph
    return [(name, layer_paths(node)) for node, name in zip(g.node, unique_node_names(g)) if op_key(node) in rules]


def layer_verdicts(ctx: GraphContext, rules: Rules, selection: Selection) -> Iterator[tuple]:
    """(node, name, rule, reason) for each main-graph node a rule applies to, in graph order; `reason` is why it
    is left alone (not selected, or the rule's check declines), None for a layer the pass will rewrite. The one
    candidate loop: the driver, budgets, calibration and int8 all read it."""
    for node in ctx.model.graph.node:
        rule = rules.get(op_key(node))
        if rule is None or not rule.applies(node, ctx):
            continue
        name = ctx.name_of(node)
        yield node, name, rule, selection.decline_reason(node, name) or rule.check(node, ctx)


def apply_rules(model: onnx.ModelProto, rules: Rules, selection: Selection | None = None, *, command: str,
                progress: Progress | None = None, shapes: dict | None = None) -> tuple[onnx.ModelProto, Report]:
    """Run one pass over the main graph and return (new model, report). The input is not modified. `shapes`:
    sizes for symbolic inputs (--input-shape)."""
    selection = selection or Selection()
    model = copy_model(model)
    report = Report(command=command)
    report.warnings += _rename_repeated(model.graph)
    ctx = GraphContext(model, shapes)
    chosen = []
    for node, name, rule, reason in layer_verdicts(ctx, rules, selection):
        if reason:
            report.layers.append(LayerReport(name=name, op_type=node.op_type, reason=reason))
        else:
            chosen.append((node, rule))
            report.layers.append(None)  # placeholder keeps graph order in the report
    _report_subgraph_nodes(model.graph, rules, report)
    slots = [i for i, x in enumerate(report.layers) if x is None]
    rewrites: dict[tuple, Rewrite] = {}
    for slot, (node, rule) in zip(slots, progress(chosen, f"{command}: layers") if progress else chosen):
        try:
            rw = rule.rewrite(node, ctx)
        except Declined as exc:
            report.layers[slot] = LayerReport(name=ctx.name_of(node), op_type=node.op_type, reason=str(exc))
            continue
        rewrites[node_key(node)] = rw
        report.layers[slot] = rw.layer
        report.warnings.extend(rw.warnings)
    if rewrites:
        _splice(model, rewrites)
    return model, report


def _rename_repeated(graph: onnx.GraphProto) -> list[str]:
    """Give each repeated node name a suffix (onnxruntime refuses to load a graph with repeated names);
    returns a warning per renamed node."""
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.name] = counts.get(node.name, 0) + 1
    warnings = []
    for node, unique in zip(graph.node, unique_node_names(graph)):
        if node.name and counts[node.name] > 1 and unique != node.name:
            warnings.append(f"node name '{node.name}' is repeated; renamed to '{unique}' (onnxruntime refuses "
                            "repeated names)")
            node.name = unique
    return warnings


def _report_subgraph_nodes(graph, rules, report):
    for node in graph.node:
        for sub in subgraphs(node):
            for inner in sub.node:
                if op_key(inner) in rules:
                    report.layers.append(LayerReport(
                        name=inner.name or inner.op_type, op_type=inner.op_type,
                        reason=f"inside the body of {node.op_type} '{node.name}': left intact"))


def _splice(model: onnx.ModelProto, rewrites: dict[tuple, Rewrite]) -> None:
    graph = model.graph
    new_nodes, new_inits, opsets = [], [], {}
    for node in graph.node:
        rw = rewrites.get(node_key(node))
        if rw is None:
            new_nodes.append(node)
        else:
            new_nodes.extend(rw.nodes)
            new_inits.extend(rw.initializers)
            opsets.update(rw.opsets)
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    listed_as_inputs = model.ir_version < 4
    if listed_as_inputs:
        graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in new_inits)
    imported = {o.domain for o in model.opset_import}
    model.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in opsets.items() if d not in imported)
    remove_unused(graph)


FLOAT_TYPES = (np.float16, np.float32, np.float64)


def constant_weight(node: onnx.NodeProto, ctx: GraphContext, index: int = 1, *, float32: bool = False,
                    finite: bool = True) -> tuple[np.ndarray | None, str | None]:
    """(weight, None) when input `index` of `node` is a constant float weight a rule can take, else (None, why
    not): the one weight check every rule starts with. `float32`: only float32 (the binary kernels and int8
    take no other); `finite`: refuse NaN and infinite values."""
    if len(node.input) <= index or not node.input[index]:
        return None, "no weight input"
    w = ctx.constant(node.input[index])
    if w is None:
        return None, f"weight '{node.input[index]}' is not a constant"
    if float32 and w.dtype != np.float32:
        return None, f"weight dtype {w.dtype} is not float32"
    if w.dtype.type not in FLOAT_TYPES:
        return None, f"weight dtype {w.dtype} is not floating point"
    if finite and not np.isfinite(w).all():
        return None, "weight has NaN or infinite values"
    return w, None
