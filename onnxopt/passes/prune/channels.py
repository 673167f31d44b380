"""The channel analysis: which layers produce and consume channels, and the groups tied by residual joins."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx

from ...graph.context import GraphContext
from ...graph.nodes import node_attributes

ELEMENTWISE_UNARY = {"Relu", "Clip", "Sigmoid", "Tanh", "LeakyRelu", "HardSwish", "HardSigmoid", "Elu", "Selu",
                     "Softplus", "Mish", "Gelu", "Erf", "Identity", "Dropout", "Neg", "Abs", "Exp", "Sqrt", "Cast",
                     "PRelu"}


SPATIAL = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Resize", "Upsample", "LpPool"}


ELEMENTWISE_BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow"}


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
    def __init__(self, model: onnx.ModelProto, shapes: dict | None = None):
        self.ctx = GraphContext(model, shapes)
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
        a, name = node_attributes(node), self.ctx.name_of(node)
        w = self.ctx.constant(node.input[1]) if len(node.input) > 1 else None
        if w is None or w.dtype != np.float32 or any(i != 0 for i in tracked):
            return False
        if node.op_type == "Conv":
            group = a.get("group", 1)
            if group != 1:
                return self._depthwise(node, tracked, w, group)
            layer = Layer(node, name, node.input[1], 0, 1, "conv", bias=optional_input(node, 2))
        elif node.op_type == "Gemm":
            if a.get("transA", 0) or w.ndim != 2:
                return False
            t = a.get("transB", 0)
            layer = Layer(node, name, node.input[1], 0 if t else 1, 1 if t else 0, "dense",
                          bias=optional_input(node, 2))
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
        self.edits.append(Edit(node, "depthwise", atoms, tuple(i for i in (1, 2) if optional_input(node, i))))
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
        axis = node_attributes(node).get("axis")
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
        axis = node_attributes(node).get("axis", 0)
        sizes = [self._channels(o, axis) for o in node.output]
        if atoms is None or axis != 1 or self._axis(node.input[0]) != 1 or None in sizes or sum(sizes) != len(atoms):
            return False
        if len(node.input) < 2 or not node.input[1] or self.ctx.constant(node.input[1]) is None:
            if "split" not in node_attributes(node):
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
        flatten_axis = 1 if reshape else node_attributes(node).get("axis", 1)
        if tracked != [0] or self._axis(node.input[0]) != 1 or flatten_axis != 1:
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


def optional_input(node, i) -> str | None:
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
