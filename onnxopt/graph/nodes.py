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




def rename_repeated(graph: onnx.GraphProto) -> list[str]:
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


def graphs_with_prefix(graph: onnx.GraphProto, prefix: str = ""):
    """The graph and every control-flow body in it, each with the prefix reports give its layers
    (`<control node>/<body>/`, nested bodies joined)."""
    yield graph, prefix
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from graphs_with_prefix(attr.g, f"{prefix}{node.name}/{attr.name}/")


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


def add_initializers(model: onnx.ModelProto, tensors) -> None:
    """Append initializers to the main graph; before IR 4 an initializer must also be listed as a graph input."""
    model.graph.initializer.extend(tensors)
    list_initializers_as_inputs(model)


def list_initializers_as_inputs(model: onnx.ModelProto) -> None:
    """Before IR 4 every initializer must also be a graph input: list those that are not (a no-op from IR 4)."""
    if model.ir_version >= 4:
        return
    listed = {i.name for i in model.graph.input}
    model.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in model.graph.initializer if t.name not in listed)


def sort_topologically(graph: onnx.GraphProto) -> None:
    """Reorder `graph.node` so every node comes after the producers of what it reads, control-flow bodies'
    outer-scope reads included (onnxruntime's quantizer sorts by listed inputs only and can move an If after
    its readers); nodes already in order keep it. Hand-written: onnx has no public sort."""
    import heapq

    nodes = list(graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    readers: dict[int, list[int]] = {i: [] for i in range(len(nodes))}
    waiting = []
    for i, n in enumerate(nodes):
        reads = set(n.input) | {name for sub in subgraphs(n) for name in names_read(sub)}
        deps = {producer[r] for r in reads if r in producer and producer[r] != i}
        for d in deps:
            readers[d].append(i)
        waiting.append(len(deps))
    ready = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for r in readers[i]:
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(ready, r)
    if len(order) != len(nodes):
        return  # a cycle: left as it is, for onnx.checker to name
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)
