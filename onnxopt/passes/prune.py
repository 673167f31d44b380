"""Channel pruning on the ONNX graph (He et al. 2017, "Channel Pruning for Accelerating Very Deep Neural
Networks"; PocketFlow's channel-pruned learner), with the channels followed through the graph.

Analysis (`ChannelGraph`): every Conv (group 1) and every Gemm / MatMul with a constant weight *produces*
channels; each channel is an atom. Atoms flow forward through the ops that keep channels apart:
BatchNormalization, elementwise activations, pooling, Resize, depthwise convs, Concat (offsets), Split (pieces),
Flatten / a flattening Reshape into a Gemm (blocks of H·W features), elementwise ops with per-channel constants.
An elementwise op joining two channel tensors (a residual Add, SiLU's Mul of x and Sigmoid(x)) ties its
operands' atoms channel by channel (union-find), so the layers feeding one Add are pruned as one *group* with one
channel set. The layers that reduce over channels (Conv, Gemm, MatMul) *consume* them: their input weights are
sliced. Anything else an atom reaches (a graph output, a channel-mixing Reshape or Transpose, a Slice, a Gather,
a softmax, a grouped conv, an op not listed here) pins it: that group is not pruned, and the report says why.

Selection per group, keeping round(keep × channels) (at least 1):
- without calibration: by magnitude, the L1 norm of each channel's filters summed over the group's producers;
- with calibration (He et al.'s reconstruction, greedy instead of LASSO): the channel set whose removal adds
  least to the consumers' output error ‖Σ_removed X_c W_cᵀ‖² on the calibration inputs, chosen greedily from
  the Gram matrix of each consumer's input (im2col patches for a conv); then each consumer's weights and bias are
  refit by least squares on the kept inputs (ridge 1e-6 of the Gram's trace). The Grams are of the input
  model's activations, collected in one pass (not layer by layer on the pruned model as the paper does).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..model import node_attributes as _attrs
from ..report import LayerReport, Report
from ..select import Selection, layer_paths, matches
from ..errors import UsageError
from . import GraphContext

ELEMENTWISE_UNARY = {"Relu", "Clip", "Sigmoid", "Tanh", "LeakyRelu", "HardSwish", "HardSigmoid", "Elu", "Selu",
                     "Softplus", "Mish", "Gelu", "Erf", "Identity", "Dropout", "Neg", "Abs", "Exp", "Sqrt", "Cast",
                     "PRelu"}
SPATIAL = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Resize", "Upsample", "LpPool"}
ELEMENTWISE_BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow"}
RIDGE = 1e-6


@dataclass
class Layer:
    """A Conv / Gemm / MatMul whose weight is sliced: along `out_axis` if it produces atoms, along `in_axis`
    (in blocks of `block` weight columns per input feature) if it consumes them."""

    node: onnx.NodeProto
    name: str
    weight: str
    out_axis: int
    in_axis: int
    kind: str  # conv | dense
    out_atoms: list[int] | None = None
    in_atoms: list[int] | None = None  # per input feature (a Flatten repeats a channel's atom H·W times)
    bias: str | None = None
    pixels: int = 1  # output positions per sample: FLOPs = params × pixels


@dataclass
class Edit:
    """A pass-through node whose constants follow the channels: `inputs` sliced along `axis` by `atoms`."""

    node: onnx.NodeProto
    kind: str  # params | depthwise | split | reshape
    atoms: list
    inputs: tuple[int, ...] = ()
    axis: int = 0


@dataclass
class Group:
    """Producers tied by shared channels, pruned with one channel set; `classes[i]` = the atoms of channel i."""

    producers: list[Layer]
    classes: list[list[int]]
    pinned: str | None = None
    keep: list[int] = field(default_factory=list)  # indices into classes
    error: float | None = None


class ChannelGraph:
    def __init__(self, model: onnx.ModelProto):
        self.ctx = GraphContext(model)
        self.parent: list[int] = []
        self.pins: dict[int, str] = {}
        self.atoms: dict[str, list[int]] = {}
        self.layers: dict[str, Layer] = {}
        self.edits: list[Edit] = []
        self._axes: dict[str, int] = {}  # channel axis of a tensor with atoms when it is not 1 (MatMul: the last)
        for node in model.graph.node:
            self._visit(node)
        for out in model.graph.output:
            self._pin(out.name, "it reaches the graph output")

    # union-find over atoms
    def _new(self, n: int) -> list[int]:
        base = len(self.parent)
        self.parent += list(range(base, base + n))
        return list(range(base, base + n))

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def _union(self, xs: list[int], ys: list[int]) -> None:
        for x, y in zip(xs, ys):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[ry] = rx

    def _pin(self, tensor: str, reason: str) -> None:
        for a in self.atoms.get(tensor, []):
            self.pins.setdefault(a, reason)

    def _channels(self, tensor: str, axis: int = 1) -> int | None:
        shape = self.ctx.shape(tensor)
        if not shape or len(shape) <= axis:
            return None
        return shape[axis] if isinstance(shape[axis], int) else None

    def _visit(self, node: onnx.NodeProto) -> None:
        op = node.op_type
        tracked = [i for i, t in enumerate(node.input) if t in self.atoms]
        if node.domain not in ("", "ai.onnx"):
            handler = None
        elif op in ("Conv", "Gemm", "MatMul"):
            handler = self._linear
        elif op in ELEMENTWISE_UNARY or op in SPATIAL:
            handler = self._unary
        elif op in ELEMENTWISE_BINARY:
            handler = self._binary
        else:
            handler = {"BatchNormalization": self._batchnorm, "Concat": self._concat, "Split": self._split,
                       "Flatten": self._flatten, "Reshape": self._reshape}.get(op)
        if handler is None or not handler(node, tracked):
            for i in tracked:
                self._pin(node.input[i], f"it reaches {op} '{self.ctx.name_of(node)}'")

    def _unary(self, node, tracked) -> bool:
        if tracked and tracked != [0]:  # PRelu's slope, Clip's bounds: per-channel constants are not followed
            return False
        if tracked and node.op_type in SPATIAL and self._axis(node.input[0]) != 1:
            return False
        if tracked:
            self.atoms[node.output[0]] = self.atoms[node.input[0]]
        return True

    def _axis(self, tensor: str) -> int:
        return self._axes.get(tensor, 1)

    def _linear(self, node, tracked) -> bool:
        a, name = _attrs(node), self.ctx.name_of(node)
        w = self.ctx.constant(node.input[1]) if len(node.input) > 1 else None
        if w is None or w.dtype != np.float32 or any(i != 0 for i in tracked):
            return False
        if node.op_type == "Conv":
            group = a.get("group", 1)
            if group != 1:
                return self._depthwise(node, tracked, w, group)
            layer = Layer(node, name, node.input[1], 0, 1, "conv", bias=_opt(node, 2))
        elif node.op_type == "Gemm":
            if a.get("transA", 0) or w.ndim != 2:
                return False
            t = a.get("transB", 0)
            layer = Layer(node, name, node.input[1], 0 if t else 1, 1 if t else 0, "dense", bias=_opt(node, 2))
        else:
            if w.ndim != 2:
                return False
            layer = Layer(node, name, node.input[1], 1, 0, "dense")
        if tracked:
            atoms = self.atoms[node.input[0]]
            width = w.shape[layer.in_axis]
            if len(atoms) != width or (node.op_type != "MatMul" and self._axis(node.input[0]) != 1):
                return False
            layer.in_atoms = atoms
        layer.out_atoms = self._new(w.shape[layer.out_axis])
        shape = self.ctx.shape(node.output[0]) or []
        positions = shape[2:] if node.op_type == "Conv" else shape[1:-1]
        layer.pixels = math.prod(d for d in positions if isinstance(d, int))
        self.atoms[node.output[0]] = layer.out_atoms
        if node.op_type == "MatMul":
            self._axes[node.output[0]] = -1
        self.layers[name] = layer
        return True

    def _depthwise(self, node, tracked, w, group) -> bool:
        if not tracked or w.shape[0] != group or w.shape[1] != 1 or len(self.atoms[node.input[0]]) != group:
            return False  # grouped (not depthwise) or a multiplier > 1: channels mix within a group
        atoms = self.atoms[node.input[0]]
        self.edits.append(Edit(node, "depthwise", atoms, tuple(i for i in (1, 2) if _opt(node, i))))
        self.atoms[node.output[0]] = atoms
        return True

    def _batchnorm(self, node, tracked) -> bool:
        if tracked != [0] or self._axis(node.input[0]) != 1:
            return False
        self.edits.append(Edit(node, "params", self.atoms[node.input[0]], (1, 2, 3, 4)))
        self.atoms[node.output[0]] = self.atoms[node.input[0]]
        return True

    def _binary(self, node, tracked) -> bool:
        if not tracked:
            return True
        atoms = self.atoms[node.input[tracked[0]]]
        axis = self._axis(node.input[tracked[0]])
        if len(tracked) == 2:
            other = self.atoms[node.input[tracked[1]]]
            if len(other) != len(atoms) or self._axis(node.input[tracked[1]]) != axis:
                return False
            self._union(atoms, other)
        else:
            j = 1 - tracked[0]
            rank = len(self.ctx.shape(node.input[tracked[0]]) or [])
            const = self.ctx.constant(node.input[j])
            shape = list(const.shape) if const is not None else self.ctx.shape(node.input[j])
            if shape is None or rank == 0:
                return False
            pos = (axis % rank) - (rank - len(shape))  # the operand's dim that broadcasts against the channels
            size = shape[pos] if 0 <= pos < len(shape) else 1
            if size == len(atoms) and const is not None:
                self.edits.append(Edit(node, "params", atoms, (j,), pos))
            elif size != 1:
                return False
        self.atoms[node.output[0]] = atoms
        if axis != 1:
            self._axes[node.output[0]] = axis
        return True

    def _concat(self, node, tracked) -> bool:
        if not tracked:
            return True
        axis = _attrs(node).get("axis")
        rank = len(self.ctx.shape(node.output[0]) or [])
        if rank == 0 or axis % rank != self._axis(node.input[tracked[0]]) % rank:
            return False
        atoms = []
        for t in node.input:
            if t in self.atoms:
                atoms += self.atoms[t]
            else:  # an input whose channels are not followed: atoms of its own, pinned
                n = self._channels(t, axis % rank)
                if n is None:
                    return False
                fresh = self._new(n)
                self.pins.update({a: "its Concat has an input whose channels are not followed" for a in fresh})
                atoms += fresh
        self.atoms[node.output[0]] = atoms
        return True

    def _split(self, node, tracked) -> bool:
        atoms = self.atoms[node.input[0]] if tracked == [0] else None
        axis = _attrs(node).get("axis", 0)
        sizes = [self._channels(o, axis) for o in node.output]
        if atoms is None or axis != 1 or self._axis(node.input[0]) != 1 or None in sizes or sum(sizes) != len(atoms):
            return False
        if len(node.input) < 2 or not node.input[1] or self.ctx.constant(node.input[1]) is None:
            if "split" not in _attrs(node):
                return False  # equal pieces (num_outputs): no sizes to rewrite
        start = 0
        pieces = []
        for out, n in zip(node.output, sizes):
            self.atoms[out] = atoms[start:start + n]
            pieces.append(atoms[start:start + n])
            start += n
        self.edits.append(Edit(node, "split", pieces))
        return True

    def _flatten(self, node, tracked, reshape: bool = False) -> bool:
        shape = self.ctx.shape(node.input[0]) or []
        if tracked != [0] or self._axis(node.input[0]) != 1 or (not reshape and _attrs(node).get("axis", 1) != 1):
            return False
        if len(shape) < 2 or not all(isinstance(d, int) for d in shape[1:]):
            return False
        block = math.prod(shape[2:])
        atoms = [a for a in self.atoms[node.input[0]] for _ in range(block)]
        self.atoms[node.output[0]] = atoms
        return True

    def _reshape(self, node, tracked) -> bool:
        """A Reshape to (N, C·H·W) is a Flatten (dynamo exports write one); any other reshape mixes channels."""
        target = self.ctx.constant(node.input[1])
        shape = self.ctx.shape(node.input[0]) or []
        if target is None or target.ndim != 1 or len(target) != 2 or len(shape) < 2:
            return False
        if not all(isinstance(d, int) for d in shape[1:]) or int(target[1]) not in (-1, math.prod(shape[1:])):
            return False
        if not self._flatten(node, tracked, reshape=True):
            return False
        self.edits.append(Edit(node, "reshape", self.atoms[node.output[0]]))
        return True


def _opt(node, i) -> str | None:
    return node.input[i] if len(node.input) > i and node.input[i] else None


def find_groups(graph: ChannelGraph) -> list[Group]:
    """Producers connected through shared channel classes (a residual stage, a SiLU pair), in graph order."""
    producers = [layer for layer in graph.layers.values() if layer.out_atoms]
    owner: dict[int, int] = {}  # class root -> group index
    members: list[list[Layer]] = []
    for layer in producers:
        roots = {graph.find(a) for a in layer.out_atoms}
        hits = sorted({owner[r] for r in roots if r in owner})
        if not hits:
            members.append([layer])
            index = len(members) - 1
        else:
            index = hits[0]
            members[index].append(layer)
            for other in hits[1:]:  # this layer ties two groups into one
                members[index] += members[other]
                members[other] = []
                owner.update({r: index for r, g in owner.items() if g == other})
        owner.update({r: index for r in roots})
    pins: dict[int, str] = {}
    for atom, reason in graph.pins.items():
        pins.setdefault(graph.find(atom), reason)
    groups = []
    for layers in filter(None, members):
        roots = list(dict.fromkeys(graph.find(a) for layer in layers for a in layer.out_atoms))
        pinned = next((pins[r] for r in roots if r in pins), None)
        groups.append(Group(layers, [[r] for r in roots], pinned))
    return groups


def _matrix(layer: Layer, w: np.ndarray) -> np.ndarray:
    """The weight as (outputs × input features) in the order the input's Gram matrix uses."""
    if layer.kind == "conv":
        return w.reshape(w.shape[0], -1)
    return w.T if layer.in_axis == 0 else w


def _from_matrix(layer: Layer, m: np.ndarray, shape: tuple) -> np.ndarray:
    return (m.T if layer.kind == "dense" and layer.in_axis == 0 else m).reshape(shape).astype(np.float32)


def magnitude(graph: ChannelGraph, group: Group) -> np.ndarray:
    """Per channel class: the L1 norm of its filters, summed over the group's producers."""
    index = {c[0]: i for i, c in enumerate(group.classes)}
    score = np.zeros(len(group.classes))
    for layer in group.producers:
        w = np.abs(graph.ctx.constant(layer.weight)).astype(np.float64)
        per_out = w.sum(axis=tuple(i for i in range(w.ndim) if i != layer.out_axis))
        for i, atom in enumerate(layer.out_atoms):
            score[index[graph.find(atom)]] += per_out[i]
    return score


def feature_atoms(layer: Layer, w: np.ndarray) -> list[int]:
    """The atom of each column of `_matrix(layer, w)` (a conv's im2col columns are channel-major)."""
    block = int(np.prod(w.shape[2:])) if layer.kind == "conv" else 1
    return [a for a in layer.in_atoms for _ in range(block)]


def reconstruction_order(graph: ChannelGraph, group: Group, grams: dict) -> tuple[list[int], list[float]] | None:
    """He et al.'s selection, greedy: the channels in the order of removal, each the one that adds least to the
    consumers' summed relative output error on the calibration inputs, with that error after each removal; None
    when no consumer has a Gram matrix."""
    index = {c[0]: i for i, c in enumerate(group.classes)}
    n = len(group.classes)
    q = np.zeros((n, n))
    found = False
    for layer in graph.layers.values():
        if not layer.in_atoms or layer.name not in grams:
            continue
        w = graph.ctx.constant(layer.weight).astype(np.float64)
        m = _matrix(layer, w)
        cls = np.array([index.get(graph.find(a), -1) for a in feature_atoms(layer, w)])
        cols = np.flatnonzero(cls >= 0)
        if not len(cols):
            continue
        found = True
        g = grams[layer.name][:-1, :-1]
        energy = max(float(np.einsum("ij,jk,ik->", m, g, m)), 1e-30)
        contrib = g[np.ix_(cols, cols)] * (m[:, cols].T @ m[:, cols]) / energy
        np.add.at(q, (cls[cols][:, None], cls[cols][None, :]), contrib)
    if not found:
        return None
    order, errors, total = [], [], 0.0
    cost = np.diag(q).copy()
    alive = np.ones(n, bool)
    for _ in range(n - 1):
        c = int(np.argmin(np.where(alive, cost, np.inf)))
        total += float(cost[c])
        alive[c] = False
        order.append(c)
        errors.append(total)
        cost += 2 * q[:, c]
    return order, errors


def magnitude_order(graph: ChannelGraph, group: Group) -> tuple[list[int], list[float]]:
    """The channels from the smallest filter L1 norm up, with the share of the group's norm removed after each."""
    score = magnitude(graph, group)
    order = np.argsort(score, kind="stable")[:len(score) - 1].tolist()
    share = np.cumsum(score[order]) / max(float(score.sum()), 1e-30)
    return order, share.tolist()


def refit(layer: Layer, w: np.ndarray, bias: np.ndarray | None, kept_cols: np.ndarray, gram: np.ndarray):
    """Least squares on the calibration Gram: the kept inputs (and a constant, for the bias) that best rebuild
    the layer's original output. Returns (matrix, bias or None, relative output error)."""
    m = _matrix(layer, w).astype(np.float64)
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


def _fraction(group: Group, keep: float, keep_for: list[tuple[str, float]]) -> float:
    for layer in group.producers:
        paths = layer_paths(layer.node)
        hit = next((f for p, f in keep_for if matches(layer.name, p, paths)), None)
        if hit is not None:
            return hit
    return keep


def choose(graph: ChannelGraph, groups: list[Group], keep: float, keep_for, selection: Selection,
           grams: dict | None, budget: tuple[str, float] | None = None) -> set[int]:
    """Each group's kept channels (group.keep): round(fraction × channels), or under `budget` (kind, fraction) the
    counts `allocate` chooses; returns the class roots removed."""
    orders = {}
    for i, group in enumerate(groups):
        declined = next((r for layer in group.producers if (r := selection.decline_reason(layer.node, layer.name))),
                        None)
        group.pinned = group.pinned or declined
        if not group.pinned and len(group.classes) > 1:
            orders[i] = (reconstruction_order(graph, group, grams) if grams else None) or \
                magnitude_order(graph, group)
    fixed = {i: max(1, round(_fraction(g, keep, keep_for) * len(g.classes))) for i, g in enumerate(groups)
             if i in orders and (budget is None or _overridden(g, keep_for))}
    if budget and not grams:  # no comparable loss across layers without data: one fraction for all (see allocate)
        counts = uniform_allocation(graph, groups, orders, fixed, budget)
    else:
        counts = allocate(graph, groups, orders, fixed, budget) if budget else fixed
    removed: set[int] = set()
    for i, group in enumerate(groups):
        k = min(counts.get(i, len(group.classes)), len(group.classes))
        gone = orders[i][0][:len(group.classes) - k] if i in orders else []
        group.keep = sorted(set(range(len(group.classes))) - set(gone))
        group.error = orders[i][1][len(gone) - 1] if gone else 0.0
        removed |= {group.classes[c][0] for c in gone}
    return removed


def _overridden(group: Group, keep_for) -> bool:
    return any(matches(layer.name, p, layer_paths(layer.node)) for layer in group.producers for p, _ in keep_for)


def prune(model: onnx.ModelProto, keep: float, keep_for=(), selection: Selection | None = None,
          grams: dict | None = None, budget: tuple[str, float] | None = None) -> tuple[onnx.ModelProto, Report]:
    """The pruned copy of `model` and its report (module docstring)."""
    from ..model import copy_model

    out = copy_model(model)
    graph = ChannelGraph(out)
    groups = find_groups(graph)
    removed_roots = choose(graph, groups, keep, list(keep_for), selection or Selection(), grams, budget)
    kept = lambda atoms: np.array([i for i, a in enumerate(atoms) if graph.find(a) not in removed_roots], int)  # noqa: E731
    rewriter = _Rewriter(out, graph)
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
    if budget:
        report.budget = budget_summary(graph, groups, budget, removed_roots)
    return out, report


class _Rewriter:
    """Slices initializers into new ones (fresh names: an initializer may be shared), then drops the unused."""

    def __init__(self, model: onnx.ModelProto, graph: ChannelGraph):
        self.model, self.graph, self.ctx = model, graph, graph.ctx
        self.replaced: set[str] = set()

    def _set(self, node, i: int, array: np.ndarray) -> None:
        old = node.input[i]
        t = self.ctx.initializer(old or f"{node.name}_in{i}", array)
        self.model.graph.initializer.append(t)
        while len(node.input) <= i:
            node.input.append("")
        node.input[i] = t.name
        self.replaced.add(old)

    def layer(self, layer: Layer, kept, gram) -> LayerReport:
        w = self.ctx.constant(layer.weight)
        bias = self.ctx.constant(layer.bias) if layer.bias else None
        out_keep = kept(layer.out_atoms) if layer.out_atoms else np.arange(w.shape[layer.out_axis])
        cols = np.arange(_matrix(layer, w).shape[1])
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
                    new_w = _from_matrix(layer, m, tuple(shape))
                else:
                    m = _matrix(layer, w)
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


# ---- --budget: channel counts per group under one params / FLOPs budget ----------------------------------------
class _Costs:
    """Params or FLOPs of the layers as channels are removed: a layer's cost is (kept outputs) × (kept input
    features) [× output positions], so removing a channel saves in every layer that makes or reads it."""

    def __init__(self, graph: ChannelGraph, kind: str):
        self.layers = list(graph.layers.values())
        self.out = []
        self.inp = []
        self.scale = []
        self.touch: dict[int, list[tuple[int, int, int]]] = {}  # root -> (layer, outputs it has, inputs it has)
        for j, layer in enumerate(self.layers):
            w = graph.ctx.constant(layer.weight)
            outs = w.shape[layer.out_axis]
            feats = int(w.size // outs)
            self.out.append(outs)
            self.inp.append(feats)
            self.scale.append(layer.pixels if kind == "flops" else 1)
            counts: dict[int, list[int]] = {}
            for a in layer.out_atoms or []:
                counts.setdefault(graph.find(a), [0, 0])[0] += 1
            for a in feature_atoms(layer, w) if layer.in_atoms is not None else []:
                counts.setdefault(graph.find(a), [0, 0])[1] += 1
            for root, (o, i) in counts.items():
                self.touch.setdefault(root, []).append((j, o, i))

    def total(self) -> int:
        return sum(o * i * s for o, i, s in zip(self.out, self.inp, self.scale))

    def saving(self, root: int) -> int:
        """What removing the channel `root` saves: its row in the layers making it, its columns in the readers."""
        return sum((o * self.inp[j] + i * self.out[j] - o * i) * self.scale[j] for j, o, i in self.touch.get(root, []))

    def remove(self, root: int) -> None:
        for j, o, i in self.touch.get(root, []):
            self.out[j] -= o
            self.inp[j] -= i


def allocate(graph: ChannelGraph, groups: list[Group], orders: dict, fixed: dict[int, int],
             budget: tuple[str, float]) -> dict[int, int]:
    """Channels per group so that the prunable layers cost at most `fraction` of their cost now: greedily remove
    the channel with the least added loss per unit of cost saved, the loss of a group being −log(1 − d) with d
    its error after the removals (share of filter norm removed, or with calibration the relative output error);
    groups given by --keep-for are removed to their count first."""
    kind, fraction = budget
    costs = _Costs(graph, kind)
    dense = costs.total()
    removed = {i: 0 for i in orders}
    for i, k in fixed.items():
        for c in orders[i][0][:len(groups[i].classes) - k]:
            costs.remove(groups[i].classes[c][0])
        removed[i] = len(groups[i].classes) - k
    free = [i for i in orders if i not in fixed]

    def loss(i, r):
        return 0.0 if r == 0 else -math.log1p(-min(orders[i][1][r - 1], 1 - 1e-12))

    allowed = fraction * dense
    while costs.total() > allowed:
        best, best_rate = None, math.inf
        for i in free:
            r = removed[i]
            if r >= len(orders[i][0]):
                continue
            saved = costs.saving(groups[i].classes[orders[i][0][r]][0])
            if saved > 0 and (rate := (loss(i, r + 1) - loss(i, r)) / saved) < best_rate:
                best, best_rate = i, rate
        if best is None:
            raise UsageError(f"--budget {kind}={fraction:g} cannot be met: the smallest budget possible is "
                             f"{kind}={math.ceil(costs.total() / dense * 1000) / 1000:g} (one channel per group)")
        costs.remove(groups[best].classes[orders[best][0][removed[best]]][0])
        removed[best] += 1
    return {i: len(groups[i].classes) - r for i, r in removed.items()}


def uniform_allocation(graph: ChannelGraph, groups: list[Group], orders: dict, fixed: dict[int, int],
                       budget: tuple[str, float]) -> dict[int, int]:
    """The largest single keep fraction (to 1/1000) whose channel counts meet the budget: without calibration
    data, the filter norm ranks channels within a layer but says nothing about which layer matters more (on the
    sample CNN at flops=0.25, a norm-share allocation reached 0.88-0.94, one fraction for all 0.97)."""
    kind, fraction = budget

    def cost(f):
        costs = _Costs(graph, kind)
        dense = costs.total()
        counts = {i: fixed.get(i, max(1, round(f * len(groups[i].classes)))) for i in orders}
        for i, k in counts.items():
            for c in orders[i][0][:len(groups[i].classes) - k]:
                costs.remove(groups[i].classes[c][0])
        return costs.total(), dense, counts

    low, high = 0.0, 1.0
    used, dense, counts = cost(low)
    if used > fraction * dense:
        raise UsageError(f"--budget {kind}={fraction:g} cannot be met: the smallest budget possible is "
                         f"{kind}={math.ceil(used / dense * 1000) / 1000:g} (one channel per group)")
    for _ in range(10):
        middle = (low + high) / 2
        if cost(middle)[0] <= fraction * dense:
            low = middle
        else:
            high = middle
    return cost(low)[2]


def budget_summary(graph: ChannelGraph, groups: list[Group], budget: tuple[str, float], removed: set[int]) -> dict:
    """The report's budget section: per group the channels kept and its error; the cost before and after."""
    kind, fraction = budget
    costs = _Costs(graph, kind)
    dense = costs.total()
    for root in removed:
        costs.remove(root)
    rows = [{"name": g.producers[0].name, "rank": len(g.keep), "max_rank": len(g.classes), "pinned": False,
             "before": len(g.classes), "after": len(g.keep), "error": g.error or 0.0}
            for g in groups if not g.pinned and len(g.classes) > 1]
    return {"budget": f"{kind}={fraction:g}", "kind": kind, "fraction": fraction, "what": "channels",
            "dense": dense, "allowed": math.floor(fraction * dense), "used": costs.total(), "layers": rows,
            "search": None}
