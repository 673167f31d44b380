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
from onnx import numpy_helper

from ..graph.context import GraphContext
from ..graph.nodes import (
    add_initializers,
    copy_model,
    names_read,
    node_key,
    op_key,
    remove_unused,
    rename_repeated,
    subgraphs,
    unique_node_names,
)
from ..graph.schemas import DOMAIN
from ..graph.selection import Selection, layer_paths, module_path
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
    """(name, module paths) of the nodes a pass could touch, control-flow bodies included, as patterns see them
    (a body's layer by its name within the body: what `--skip` matches there)."""
    return list(_candidates(model.graph, rules))


def _candidates(graph: onnx.GraphProto, rules: Rules):
    for node, name in zip(graph.node, unique_node_names(graph)):
        if op_key(node) in rules:
            yield name, layer_paths(node)
        for body in subgraphs(node):
            yield from _candidates(body, rules)


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
                progress: Progress | None = None, shapes: dict | None = None,
                reserved: frozenset = frozenset(), scope: str = "",
                custom_ops_in_bodies: bool = False) -> tuple[onnx.ModelProto, Report]:
    """Run one pass over the graph and its control-flow bodies (If/Loop/Scan) and return (new model, report).
    The input is not modified. `shapes`: sizes for symbolic inputs (--input-shape); `reserved`: names taken
    outside this graph (a body's enclosing scopes), which new tensors must not reuse; `custom_ops_in_bodies`:
    com.onnxopt ops may go into If bodies (a later pass replaces them by standard ops)."""
    selection = selection or Selection()
    model = copy_model(model)
    report = Report(command=command)
    report.warnings += rename_repeated(model.graph)
    ctx = GraphContext(model, shapes, reserved=reserved, scope=scope)
    chosen = []
    for node, name, rule, reason in layer_verdicts(ctx, rules, selection):
        if reason:
            report.layers.append(LayerReport(name=name, op_type=node.op_type, reason=reason))
        else:
            chosen.append((node, rule))
            report.layers.append(None)  # placeholder keeps graph order in the report
    _rewrite_bodies(model, ctx, rules, selection, command, report, custom_ops_in_bodies)
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
        report.warnings += [w for w in rw.warnings if w not in report.warnings]
    modules = {ctx.name_of(node): module_path(node) for node in model.graph.node}
    for layer in report.layers:
        layer.module = layer.module or modules.get(layer.name, "")
    if rewrites:
        _splice(model, rewrites)
    elif report.changed:  # only bodies changed: the outer weights they replaced are unread now
        remove_unused(model.graph)
    return model, report


def _rewrite_bodies(model: onnx.ModelProto, ctx: GraphContext, rules: Rules, selection: Selection, command: str,
                    report: Report, custom_ops_in_bodies: bool = False) -> None:
    """The same pass inside every control-flow body, in place. A body reads outer-scope tensors: it is run as a
    model of its own whose extra inputs are those tensors (outer constants as initializers, so weights defined
    outside are seen), and those are taken out again afterwards; a replaced outer weight stays outside for
    whoever else reads it, and is dropped with the rest of the unread once nothing does."""
    for node, attr_name, body in list(control_bodies(model)):
        new_body, body_report, opsets = _rewrite_body(body, model, ctx, rules, selection, command,
                                                      ctx.scope + body_layer_name(ctx, node, attr_name, ""))
        if node.op_type not in CUSTOM_OPS_LOAD_IN and not custom_ops_in_bodies and _has_custom_ops(new_body):
            for layer in body_report.changed:
                layer.action, layer.reason = "skipped", (
                    f"inside {node.op_type} '{ctx.name_of(node)}': onnxruntime cannot load com.onnxopt "
                    f"ops in {node.op_type} bodies (binarize --emulate writes standard ops there, without "
                    "--calibration or fine-tuning)")
            new_body, opsets = body, []
        body.CopyFrom(new_body)
        for layer in body_report.layers:
            layer.name = body_layer_name(ctx, node, attr_name, layer.name)
        report.layers += body_report.layers
        report.warnings += [w for w in body_report.warnings if w not in report.warnings]
        imported = {o.domain for o in model.opset_import}
        model.opset_import.extend(o for o in opsets if o.domain not in imported)


def body_layer_name(ctx: GraphContext, node: onnx.NodeProto, attr_name: str, name: str) -> str:
    """How reports name a layer inside a body: `<control node>/<body>/<layer>`."""
    return f"{ctx.name_of(node)}/{attr_name}/{name}"


# control-flow bodies where onnxruntime (1.32) loads com.onnxopt ops: an If branch fails its type inference
# ("com.onnxopt:BitConv(-1) is not a registered function/op"), a Loop body loads and runs
CUSTOM_OPS_LOAD_IN = ("Loop",)


def _has_custom_ops(graph: onnx.GraphProto) -> bool:
    return any(n.domain == DOMAIN or any(_has_custom_ops(s) for s in subgraphs(n)) for n in graph.node)


def _rewrite_body(body: onnx.GraphProto, parent: onnx.ModelProto, ctx: GraphContext, rules: Rules,
                  selection: Selection, command: str, prefix: str):
    scope, outer = body_as_model(body, parent, ctx)
    new, body_report = apply_rules(scope, rules, selection, command=command, reserved=ctx.taken, scope=prefix)
    return body_of(new, outer), body_report, list(new.opset_import)


def body_as_model(body: onnx.GraphProto, parent: onnx.ModelProto, ctx: GraphContext) -> tuple[onnx.ModelProto, set]:
    """A control-flow body as a model of its own, so that a pass (or onnxruntime's quantizer) sees its layers with
    their weights: the outer-scope tensors it reads become initializers (constants) or inputs (the rest). Returns
    the model and those outer names, which `body_of` takes out again."""
    scope = onnx.ModelProto()
    scope.ir_version = max(parent.ir_version, 4)  # (IR 3 would list new initializers as inputs: not in a body)
    scope.opset_import.extend(parent.opset_import)
    scope.graph.CopyFrom(body)
    g = scope.graph
    own = {i.name for i in g.input} | {t.name for t in g.initializer} | {o for n in g.node for o in n.output}
    outer = sorted(names_read(g) - own - {""})
    for name in outer:
        value = ctx.constant(name)
        if value is not None:
            g.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        else:
            g.input.append(ctx.value_infos.get(name) or onnx.ValueInfoProto(name=name))
    return scope, set(outer)


def body_of(scope: onnx.ModelProto, outer: set) -> onnx.GraphProto:
    """The body again from a model made by `body_as_model` (and rewritten): outer-scope tensors taken out; a
    replaced outer weight stays outside for whoever else reads it."""
    g = onnx.GraphProto()
    g.CopyFrom(scope.graph)
    kept_inits = [t for t in g.initializer if t.name not in outer]
    kept_inputs = [i for i in g.input if i.name not in outer]
    del g.initializer[:], g.input[:]
    g.initializer.extend(kept_inits)
    g.input.extend(kept_inputs)
    return g


def control_bodies(model: onnx.ModelProto) -> Iterator[tuple[onnx.NodeProto, str, onnx.GraphProto]]:
    """(control node, attribute name, body) for every If/Loop/Scan body of the main graph, in graph order."""
    for node in model.graph.node:
        for attr in node.attribute:
            for body in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                yield node, attr.name, body


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
    add_initializers(model, new_inits)
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


class TableRule(Rule):
    """Gather of rows from a constant 2-D float32 initializer table: an embedding (a transformer's token table is
    often half its weights). A Gather over shapes or indices is no layer."""

    def applies(self, node, ctx):
        table = ctx.constant(node.input[0])
        return table is not None and table.ndim >= 2 and np.issubdtype(table.dtype, np.floating)

    def check(self, node, ctx):
        table = ctx.constant(node.input[0])
        if node.input[0] not in {t.name for t in ctx.model.graph.initializer}:
            return "table is computed (not an initializer)"
        if table.dtype != np.float32 or table.ndim != 2:
            return f"table is {table.ndim}-D {table.dtype}: 2-D float32 tables are quantized"
        return None


def verdicts_with_bodies(model: onnx.ModelProto, rules: Rules, selection: Selection,
                         shapes: dict | None = None) -> Iterator[tuple]:
    """`layer_verdicts` over the main graph, then over each If/Loop/Scan body (as `body_as_model` shows it):
    (context, node, name, reason, in_body); a body's layer named `<control node>/<body>/<layer>`. For passes
    that hand the rewriting to another tool (onnxruntime's quantizers) and for budgets over the whole model."""
    ctx = GraphContext(model, shapes)
    for node, name, _, reason in layer_verdicts(ctx, rules, selection):
        yield ctx, node, name, reason, False
    for control, attr_name, body in control_bodies(model):
        prefix = body_layer_name(ctx, control, attr_name, "")
        scope_ctx = GraphContext(body_as_model(body, model, ctx)[0], scope=prefix)
        for node, name, _, reason in layer_verdicts(scope_ctx, rules, selection):
            yield scope_ctx, node, body_layer_name(ctx, control, attr_name, name), reason, True


def rewrite_bodies_as_models(model: onnx.ModelProto, include: list[str], rewrite) -> onnx.ModelProto:
    """`rewrite(body model, [layer names in it])` on each body holding a layer of `include` (names as
    `verdicts_with_bodies` gives them), in place: each body is rewritten as a model of its own, outer-scope
    weights as its initializers (tools that need a weight as an initializer then see it), and put back; opsets
    it adds are imported, and an outer weight nobody reads any more is dropped."""
    ctx = GraphContext(model)
    changed = False
    for node, attr_name, body in list(control_bodies(model)):
        prefix = body_layer_name(ctx, node, attr_name, "")
        names = [name[len(prefix):] for name in include if name.startswith(prefix)]
        if names:
            scope, outer = body_as_model(body, model, ctx)
            new = rewrite(scope, names)
            body.CopyFrom(body_of(new, outer))
            imported = {o.domain for o in model.opset_import}
            model.opset_import.extend(o for o in new.opset_import if o.domain not in imported)
            changed = True
    if changed:
        remove_unused(model.graph)
    return model
