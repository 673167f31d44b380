"""What a rewrite rule may ask about a graph: its constants, inferred shapes, node names and producers, and
fresh names for the tensors it adds (read-only: rules never edit the graph)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .constants import Constants
from .nodes import node_key, subgraphs, unique_node_names
from .shapes import infer_shapes, static_shape


class GraphContext:
    """Read-only facts about the graph a rule may ask for, plus a fresh-name source."""

    def __init__(self, model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None,
                 reserved: frozenset = frozenset(), scope: str = ""):
        g = model.graph
        self.model = model
        self.scope = scope  # inside a control-flow body: `<control node>/<body>/`, the prefix of its layers' ids
        self.constants = Constants(g)
        self.value_infos = infer_shapes(model, shapes)
        self.node_names = {node_key(n): name for n, name in zip(g.node, unique_node_names(g))}
        self.producers = {o: n for n in g.node for o in n.output}
        self._taken = {t.name for t in g.initializer} | {v.name for v in g.input} | {v.name for v in g.output}
        self._taken |= {o for n in g.node for o in n.output} | {n.name for n in g.node} | set(reserved)
        for n in g.node:  # names inside control-flow bodies are taken too (a body may not redefine a name)
            self._taken |= _body_names(n)

    @property
    def taken(self) -> frozenset:
        """Every name in use in this graph, its bodies and the scopes around it."""
        return frozenset(self._taken)

    def name_of(self, node: onnx.NodeProto) -> str:
        return self.node_names[node_key(node)]

    def layer_id(self, node: onnx.NodeProto) -> str:
        """The node's name across the whole model (a body's layer prefixed by its scope): what a budget's
        allocation is keyed by; patterns match `name_of`."""
        return self.scope + self.name_of(node)

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


def _body_names(node: onnx.NodeProto) -> set[str]:
    names = set()
    for body in subgraphs(node):
        names |= {i.name for i in body.input} | {t.name for t in body.initializer}
        for inner in body.node:
            names |= set(inner.output) | {inner.name} | _body_names(inner)
    return names
