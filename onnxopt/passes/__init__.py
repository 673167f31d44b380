"""Rewrite passes: one module per op family, each a dict of rules keyed by (domain, op_type).

A rule has `check(node, ctx) -> reason | None` (why it declines) and
`rewrite(node, ctx) -> Rewrite` (new nodes and initializers, never touching the graph itself).
`apply_rules` is the one driver: it selects, asks each rule, splices the results in, and drops
initializers and Constant nodes nothing reads any more.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

import numpy as np
import onnx
from onnx import numpy_helper

from ..model import constant_values, infer_shapes, static_shape, unique_node_names
from ..report import LayerReport, Report
from ..select import Selection

Progress = Callable[[list, str], Iterable]


def node_key(node: onnx.NodeProto) -> tuple:
    """Identifies a node within its graph (protobuf hands out a new Python wrapper on every access,
    so id() does not); outputs are unique in a valid graph, inputs and type settle output-less nodes."""
    return node.op_type, tuple(node.input), tuple(node.output), node.name


class Declined(Exception):
    """Raised by a rewrite that finds, once it has computed, that it should leave the node alone."""


@dataclass
class Rewrite:
    nodes: list[onnx.NodeProto]
    initializers: list[onnx.TensorProto]
    layer: LayerReport
    warnings: list[str] = field(default_factory=list)


class Rule(Protocol):
    def check(self, node: onnx.NodeProto, ctx: "GraphContext") -> str | None: ...

    def rewrite(self, node: onnx.NodeProto, ctx: "GraphContext") -> Rewrite: ...


@dataclass
class GraphContext:
    """Read-only facts about the graph a rule may ask for, plus a fresh-name source."""

    model: onnx.ModelProto
    options: Any = None
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    value_infos: dict[str, onnx.ValueInfoProto] = field(default_factory=dict)
    node_names: dict[tuple, str] = field(default_factory=dict)
    _taken: set[str] = field(default_factory=set)

    @classmethod
    def build(cls, model: onnx.ModelProto, options: Any = None) -> "GraphContext":
        g = model.graph
        taken = {t.name for t in g.initializer} | {v.name for v in g.input} | {v.name for v in g.output}
        taken |= {o for n in g.node for o in n.output} | {n.name for n in g.node}
        return cls(model=model, options=options, constants=constant_values(g), value_infos=infer_shapes(model),
                   node_names={node_key(n): name for n, name in zip(g.node, unique_node_names(g))}, _taken=taken)

    @property
    def producers(self) -> dict[str, onnx.NodeProto]:
        """Tensor name → the node that produces it (main graph)."""
        if not hasattr(self, "_producers"):
            self._producers = {o: n for n in self.model.graph.node for o in n.output}
        return self._producers

    def name_of(self, node: onnx.NodeProto) -> str:
        return self.node_names[node_key(node)]

    def constant(self, tensor_name: str) -> np.ndarray | None:
        return self.constants.get(tensor_name)

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


def candidate_names(model: onnx.ModelProto, rules: dict[tuple[str, str], Rule]) -> list[str]:
    """Names of the main-graph nodes a pass could touch, as reports and patterns see them."""
    g = model.graph
    return [name for node, name in zip(g.node, unique_node_names(g)) if (_domain(node), node.op_type) in rules]


def apply_rules(model: onnx.ModelProto, rules: dict[tuple[str, str], Rule], selection: Selection, *,
                command: str, options: Any = None, progress: Progress | None = None) -> tuple[onnx.ModelProto, Report]:
    """Run one pass over the main graph and return (new model, report). The input is not modified."""
    model = _copy(model)
    report = Report(command=command)
    report.warnings += _rename_repeated(model.graph)
    ctx = GraphContext.build(model, options)
    for pattern in selection.unused_patterns(candidate_names(model, rules)):
        report.warnings.append(f"pattern '{pattern}' matches no {'/'.join(op for _, op in rules)} layer")
    graph = model.graph
    chosen = []
    for node in graph.node:
        rule = rules.get((_domain(node), node.op_type))
        if rule is None or (hasattr(rule, "applies") and not rule.applies(node, ctx)):
            continue
        name = ctx.name_of(node)
        reason = selection.decline_reason(node, name) or rule.check(node, ctx)
        if reason:
            report.layers.append(LayerReport(name=name, op_type=node.op_type, reason=reason))
        else:
            chosen.append((node, rule))
            report.layers.append(None)  # placeholder keeps graph order in the report
    _report_subgraph_nodes(graph, rules, report)
    slots = [i for i, x in enumerate(report.layers) if x is None]
    rewrites: dict[tuple, Rewrite] = {}
    items = progress(chosen, command) if progress else chosen
    for slot, (node, rule) in zip(slots, items):
        try:
            rw = rule.rewrite(node, ctx)
            rewrites[node_key(node)] = rw
            report.layers[slot] = rw.layer
            report.warnings.extend(rw.warnings)
        except Declined as exc:
            report.layers[slot] = LayerReport(name=ctx.name_of(node), op_type=node.op_type, reason=str(exc))
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


def _domain(node: onnx.NodeProto) -> str:
    return "" if node.domain == "ai.onnx" else node.domain


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The bodies of a control-flow node (If branches, Loop/Scan bodies); empty for other nodes."""
    return [g for attr in node.attribute
            for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs))]


def _report_subgraph_nodes(graph, rules, report):
    for node in graph.node:
        for sub in subgraphs(node):
            for inner in sub.node:
                if (_domain(inner), inner.op_type) in rules:
                    report.layers.append(LayerReport(
                        name=inner.name or inner.op_type, op_type=inner.op_type,
                        reason=f"inside the body of {node.op_type} '{node.name}': left intact"))


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _splice(model: onnx.ModelProto, rewrites: dict[tuple, Rewrite]) -> None:
    graph = model.graph
    new_nodes, new_inits = [], []
    for node in graph.node:
        rw = rewrites.get(node_key(node))
        if rw is None:
            new_nodes.append(node)
        else:
            new_nodes.extend(rw.nodes)
            new_inits.extend(rw.initializers)
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    listed_as_inputs = model.ir_version < 4
    if listed_as_inputs:
        graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in new_inits)
    remove_unused(graph)


def _names_read(graph: onnx.GraphProto) -> set[str]:
    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(node.input)
        for sub in subgraphs(node):  # subgraphs may read outer-scope names
            used |= _names_read(sub)
    return used


def remove_unused(graph: onnx.GraphProto) -> None:
    """Drop nodes and initializers whose outputs nothing reads."""
    while True:
        used = _names_read(graph)
        # ONNX ops have no side effects: a node nobody reads from is dead (rewrites leave such behind)
        dead = [n for n in graph.node if n.output and all(o not in used for o in n.output)]
        for n in dead:
            graph.node.remove(n)
        if not dead:
            break
    used = _names_read(graph)
    unused = {t.name for t in graph.initializer if t.name not in used}
    kept = [t for t in graph.initializer if t.name not in unused]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    inputs = [i for i in graph.input if i.name not in unused]
    del graph.input[:]
    graph.input.extend(inputs)
