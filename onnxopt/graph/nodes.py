"""Node and graph helpers every layer shares: keys and registry keys of nodes, unique names, attributes,
control-flow bodies, and dropping what nothing reads.
"""
from __future__ import annotations

import onnx


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy: rewrites work on their own copy, the caller's model is never modified."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def node_attributes(node: onnx.NodeProto) -> dict:
    """A node's attributes as Python values."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def unique_node_names(graph: onnx.GraphProto) -> list[str]:
    """A name per node, usable as a prefix for new tensors: the node's own where it is unique."""
    seen: dict[str, int] = {}
    names = []
    for i, node in enumerate(graph.node):
        base = node.name or f"{node.op_type}_{i}"
        if base in seen:
            seen[base] += 1
            base = f"{base}_{seen[base]}"
        seen.setdefault(base, 0)
        names.append(base)
    return names




def node_key(node: onnx.NodeProto) -> tuple:
    """Identifies a node within its graph (protobuf hands out a new Python wrapper on every access,
    so id() does not); outputs are unique in a valid graph, inputs and type settle output-less nodes."""
    return node.op_type, tuple(node.input), tuple(node.output), node.name


def op_key(node: onnx.NodeProto) -> tuple[str, str]:
    """The registry key of a node: (domain, op_type), the default domain spelled ''."""
    return ("" if node.domain == "ai.onnx" else node.domain), node.op_type


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The bodies of a control-flow node (If branches, Loop/Scan bodies); empty for other nodes."""
    return [g for attr in node.attribute
            for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs))]


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
