"""Rewrite passes: one module per op family, each a dict of rules keyed by (domain, op_type).

A rule is built from its options and has `applies(node, ctx)` (is this node a candidate at all),
`check(node, ctx) -> reason | None` (why it declines) and `rewrite(node, ctx) -> Rewrite` (new nodes,
initializers and opset imports, never touching the graph itself). `apply_rules` is the one driver: it
selects, asks each rule, splices the results in, and drops what nothing reads any more.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from ..model import Constants, copy_model, infer_shapes, static_shape, unique_node_names
from ..report import LayerReport, Report
from ..select import Selection, layer_paths

Progress = Callable[[list, str], Iterable]


def node_key(node: onnx.NodeProto) -> tuple:
    """Identifies a node within its graph (protobuf hands out a new Python wrapper on every access,
    so id() does not); outputs are unique in a valid graph, inputs and type settle output-less nodes."""
    return node.op_type, tuple(node.input), tuple(node.output), node.name


def op_key(node: onnx.NodeProto) -> tuple[str, str]:
    """The registry key of a node: (domain, op_type), the default domain spelled ''."""
    return ("" if node.domain == "ai.onnx" else node.domain), node.op_type


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


class GraphContext:
    """Read-only facts about the graph a rule may ask for, plus a fresh-name source."""

    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.model = model
        self.constants = Constants(g)
        self.value_infos = infer_shapes(model)
        self.node_names = {node_key(n): name for n, name in zip(g.node, unique_node_names(g))}
        self.producers = {o: n for n in g.node for o in n.output}
        self._taken = {t.name for t in g.initializer} | {v.name for v in g.input} | {v.name for v in g.output}
        self._taken |= {o for n in g.node for o in n.output} | {n.name for n in g.node}

    def name_of(self, node: onnx.NodeProto) -> str:
        return self.node_names[node_key(node)]

    def constant(self, tensor_name: str) -> np.ndarray | None:
        return self.constants.get(tensor_name) if tensor_name else None

    def shape(self, tensor_name: str) -> list[int | str | None] | None:
        vi = self.value_infos.get(tensor_name)
        if vi is None or not vi.type.tensor_type.HasField("shape"):
            return None
        return static_shape(vi)

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self._taken:
            i += 1
            name = f"{base}_{i}"
        self._taken.add(name)
        return name

    def initializer(self, base: str, array: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(np.ascontiguousarray(array), self.fresh(base))


def candidate_layers(model: onnx.ModelProto, rules: Rules) -> list[tuple[str, tuple[str, ...]]]:
    """(name, module paths) of the main-graph nodes a pass could touch, as reports and patterns see them."""
    g = model.graph
    return [(name, layer_paths(node)) for node, name in zip(g.node, unique_node_names(g)) if op_key(node) in rules]


def apply_rules(model: onnx.ModelProto, rules: Rules, selection: Selection | None = None, *, command: str,
                progress: Progress | None = None) -> tuple[onnx.ModelProto, Report]:
    """Run one pass over the main graph and return (new model, report). The input is not modified."""
    selection = selection or Selection()
    model = copy_model(model)
    report = Report(command=command)
    report.warnings += _rename_repeated(model.graph)
    ctx = GraphContext(model)
    chosen = []
    for node in model.graph.node:
        rule = rules.get(op_key(node))
        if rule is None or not rule.applies(node, ctx):
            continue
        name = ctx.name_of(node)
        reason = selection.decline_reason(node, name) or rule.check(node, ctx)
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


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The bodies of a control-flow node (If branches, Loop/Scan bodies); empty for other nodes."""
    return [g for attr in node.attribute
            for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs))]


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


def names_read(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name the graph's nodes (subgraphs included) and outputs read."""
    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(node.input)
        for sub in subgraphs(node):  # subgraphs may read outer-scope names
            used |= names_read(sub)
    return used


def remove_unused(graph: onnx.GraphProto) -> None:
    """Drop nodes and initializers whose outputs nothing reads."""
    while True:
        used = names_read(graph)
        # ONNX ops have no side effects: a node nobody reads from is dead (rewrites leave such behind)
        dead = [n for n in graph.node if n.output and all(o not in used for o in n.output)]
        for n in dead:
            graph.node.remove(n)
        if not dead:
            break
    used = names_read(graph)
    unused = {t.name for t in graph.initializer if t.name not in used}
    kept = [t for t in graph.initializer if t.name not in unused]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    inputs = [i for i in graph.input if i.name not in unused]
    del graph.input[:]
    graph.input.extend(inputs)
