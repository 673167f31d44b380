"""The pruned graph: weights sliced along the kept channels, consumers refit by least squares on calibration
data.
"""
from __future__ import annotations

import math

import numpy as np
import onnx

from ...graph.nodes import add_initializers, rename_repeated
from ...graph.selection import Selection
from ...report import LayerReport, Report
from ..rules import Rule, constant_weight, verdicts_with_bodies
from .budget import budget_summary, choose
from .channels import ChannelGraph, Edit, Layer, find_groups
from .ranking import RIDGE, as_matrix, feature_atoms, from_matrix


def refit(layer: Layer, w: np.ndarray, bias: np.ndarray | None, kept_cols: np.ndarray, gram: np.ndarray):
    """Least squares on the calibration Gram: the kept inputs (and a constant, for the bias) that best rebuild
    the layer's original output. Returns (matrix, bias or None, relative output error)."""
    m = as_matrix(layer, w).astype(np.float64)
    theta = np.vstack([m.T, (bias if bias is not None else np.zeros(m.shape[0]))[None, :]])
    rows = np.append(kept_cols, gram.shape[0] - 1) if bias is not None else kept_cols
    g = gram if bias is not None else gram[:-1, :-1]
    theta = theta if bias is not None else theta[:-1]
    gss = g[np.ix_(rows, rows)]
    ridge = RIDGE * np.trace(gss) / max(len(rows), 1)
    new = np.linalg.solve(gss + ridge * np.eye(len(rows)), g[rows] @ theta)
    total = float(np.einsum("ij,jk,ki->", theta.T, g, theta))
    rest = total - 2 * float(np.einsum("ij,jk,ki->", new.T, g[rows], theta)) + float(
        np.einsum("ij,jk,ki->", new.T, gss, new))
    error = math.sqrt(max(rest, 0.0) / total) if total > 0 else 0.0
    if bias is not None:
        return new[:-1].T, new[-1].astype(np.float32), error
    return new.T, None, error


def prune(model: onnx.ModelProto, keep: float, keep_for=(), selection: Selection | None = None,
          grams: dict | None = None, budget: tuple[str, float] | None = None,
          shapes: dict | None = None) -> tuple[onnx.ModelProto, Report]:
    """The pruned copy of `model` and its report (the package docstring); `shapes`: --input-shape sizes."""
    from ...graph.nodes import copy_model

    out = copy_model(model)
    graph = ChannelGraph(out, shapes)
    groups = find_groups(graph)
    removed_roots = choose(graph, groups, keep, list(keep_for), selection or Selection(), grams, budget)
    kept = lambda atoms: np.array([i for i, a in enumerate(atoms) if graph.find(a) not in removed_roots], int)  # noqa: E731
    rewriter = Rewriter(out, graph)
    report = Report(command="prune")
    pinned = {id(layer): g.pinned for g in groups for layer in g.producers}
    for layer in graph.layers.values():
        row = rewriter.layer(layer, kept, (grams or {}).get(layer.name))
        if row.params_after == row.params_before and pinned.get(id(layer)):
            row.action, row.reason = "skipped", pinned[id(layer)]
        report.layers.append(row)
    for edit in graph.edits:
        rewriter.edit(edit, kept)
    rewriter.finish()
    report.layers += _body_layers(model, selection or Selection())
    report.warnings += rename_repeated(out.graph)
    if budget:
        report.budget = budget_summary(graph, groups, budget, removed_roots)
    return out, report


class Rewriter:
    """Slices initializers into new ones (fresh names: an initializer may be shared), then drops the unused."""

    def __init__(self, model: onnx.ModelProto, graph: ChannelGraph):
        self.model, self.graph, self.ctx = model, graph, graph.ctx
        self.replaced: set[str] = set()

    def _set(self, node, i: int, array: np.ndarray) -> None:
        old = node.input[i]
        t = self.ctx.initializer(old or f"{node.name}_in{i}", array)
        add_initializers(self.model, [t])
        while len(node.input) <= i:
            node.input.append("")
        node.input[i] = t.name
        self.replaced.add(old)

    def layer(self, layer: Layer, kept, gram) -> LayerReport:
        w = self.ctx.constant(layer.weight)
        bias = self.ctx.constant(layer.bias) if layer.bias else None
        out_keep = kept(layer.out_atoms) if layer.out_atoms else np.arange(w.shape[layer.out_axis])
        cols = np.arange(as_matrix(layer, w).shape[1])
        error = None
        new_w = w
        if layer.in_atoms is not None:
            atoms = feature_atoms(layer, w)
            cols = kept(atoms)
            in_keep = kept(layer.in_atoms)
            if len(cols) < len(atoms):
                if gram is not None:
                    if bias is None and layer.kind == "conv":  # a conv can take a bias: the refit's intercept
                        bias = np.zeros(w.shape[0], np.float32)
                    m, bias, error = refit(layer, w.astype(np.float64), bias, cols, gram)
                    shape = list(w.shape)
                    shape[layer.in_axis] = len(in_keep)
                    new_w = from_matrix(layer, m, tuple(shape))
                else:
                    m = as_matrix(layer, w)
                    error = float(np.linalg.norm(np.delete(m, cols, axis=1)) / max(np.linalg.norm(m), 1e-30))
                    new_w = np.take(w, in_keep, axis=layer.in_axis)
        new_w = np.take(new_w, out_keep, axis=layer.out_axis)
        changed = new_w.shape != w.shape
        if changed:
            self._set(layer.node, 1, new_w)
            if bias is not None:
                self._set(layer.node, 2, np.asarray(bias, np.float32)[out_keep])
        before = w.size + (0 if layer.bias is None else w.shape[layer.out_axis])
        after = new_w.size + (0 if bias is None else len(out_keep)) if changed else before
        channels = f"{w.shape[layer.out_axis]}->{len(out_keep)}"
        if layer.in_atoms is not None:
            channels = f"{w.shape[layer.in_axis]}->{new_w.shape[layer.in_axis]} in, {channels} out"
        return LayerReport(name=layer.name, op_type=layer.node.op_type, shape="x".join(map(str, w.shape)),
                           action="pruned" if changed else "skipped",
                           reason="" if changed else "all its channels kept", channels=channels, params_before=before,
                           params_after=after, flops_before=w.size * layer.pixels,
                           flops_after=new_w.size * layer.pixels, error=error,
                           bytes_before=4 * before, bytes_after=4 * after)

    def edit(self, edit: Edit, kept) -> None:
        node = edit.node
        if edit.kind == "split":
            sizes = np.array([len(kept(piece)) for piece in edit.atoms], np.int64)
            if len(node.input) > 1 and node.input[1]:
                self._set(node, 1, sizes)
            else:
                for a in node.attribute:
                    if a.name == "split":
                        del a.ints[:]
                        a.ints.extend(sizes.tolist())
            return
        keep = kept(edit.atoms)
        if len(keep) == len(edit.atoms):
            return
        if edit.kind == "reshape":
            target = self.ctx.constant(node.input[1]).copy()
            if target[1] != -1:
                target[1] = len(keep)
            self._set(node, 1, target)
            return
        for i in edit.inputs:
            value = self.ctx.constant(node.input[i])
            axis = 0 if edit.kind == "depthwise" else edit.axis
            self._set(node, i, np.take(value, keep, axis=axis))
        if edit.kind == "depthwise":
            for a in node.attribute:
                if a.name == "group":
                    a.i = len(keep)

    def finish(self) -> None:
        """Drop the initializers nothing reads any more, and the stale shapes (channel counts changed)."""
        g = self.model.graph
        used = {t for n in g.node for t in n.input}
        keep = [t for t in g.initializer if t.name in used or t.name not in self.replaced]
        del g.initializer[:]
        g.initializer.extend(keep)
        names = {t.name for t in keep}
        inputs = [i for i in g.input if i.name in names or i.name not in self.replaced]
        del g.input[:]
        g.input.extend(inputs)
        del g.value_info[:]


class _BodyLayer(Rule):
    def check(self, node, ctx):
        return constant_weight(node, ctx)[1] or (
            "inside a control-flow body: prune follows channels through the main graph only (factor and quantize "
            "reach body layers)")


def _body_layers(model: onnx.ModelProto, selection: Selection) -> list[LayerReport]:
    """A row for each weighted layer inside an If/Loop/Scan body, saying why it is left whole."""
    rules = {("", op): _BodyLayer() for op in ("Conv", "Gemm", "MatMul")}
    return [LayerReport(name=name, op_type=node.op_type, reason=reason)
            for _, node, name, reason, in_body in verdicts_with_bodies(model, rules, selection) if in_body]
