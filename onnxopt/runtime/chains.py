"""BitConv layers chained in packed bits, for a session on the native library (kernels/chain.py says why it is exact).

A link is a 2-D BitConv whose output reaches a 2-D BitConv's input only through Relu and at most one MaxPool (floor
mode), each tensor on the way read by that one next node and not a graph output. The producer of a link becomes
PackedBitConvSigns (sign bits out), the consumer reads them as PackedBitConv(Signs) with the MaxPool as its `pool`
input, and the Relu / MaxPool nodes between go; a chain's first layer gets a PackSigns in front. The rewrite
is made for the session only: the lowered file keeps plain BitConv, which every runtime path can run.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..graph import schemas as ops
from ..graph.constants import Constants
from ..graph.nodes import copy_model, node_attributes
from ..kernels.geometry import MAX_PAD, MAX_STEP, NO_POOL


@dataclass
class Link:
    producer: onnx.NodeProto
    consumer: onnx.NodeProto
    pool: np.ndarray  # kernels/chain.py's pool vector (NO_POOL when no MaxPool is on the way)
    glue: list[onnx.NodeProto]  # the Relu / MaxPool nodes between, removed


def _is_plain(node: onnx.NodeProto, op_type: str) -> bool:
    return node.op_type == op_type and node.domain in ("", "ai.onnx")


def _pool_vector(node: onnx.NodeProto) -> np.ndarray | None:
    """A MaxPool's window as kernels/chain.py's pool vector, or None when chaining cannot reproduce it (ceil mode,
    auto_pad, not 2-D, the Indices output used)."""
    a = node_attributes(node)
    kernel = list(a.get("kernel_shape", []))
    if len(kernel) != 2 or a.get("ceil_mode", 0) or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    if len(node.output) > 1 and node.output[1]:
        return None
    strides, dilations = list(a.get("strides", [1, 1])), list(a.get("dilations", [1, 1]))
    pads = list(a.get("pads", [0, 0, 0, 0]))
    if len(strides) != 2 or len(dilations) != 2 or len(pads) != 4:
        return None
    if not all(1 <= v <= MAX_STEP for v in kernel + strides + dilations) or not all(0 <= v <= MAX_PAD for v in pads):
        return None  # outside what the chain op accepts (runtime/native/library.c)
    return np.array(kernel + strides + dilations + pads, np.int64)


def find_links(graph: onnx.GraphProto, constants: Constants) -> list[Link]:
    """The links of `graph` (its top level)."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}

    def chainable(node) -> bool:
        if not ops.is_custom(node, ops.BIT_CONV) or len(node.input) != 5:
            return False
        geometry = constants.get(node.input[4])
        return geometry is not None and int(geometry[0]) == 2

    links = []
    for node in graph.node:
        if not chainable(node):
            continue
        tensor, pool, glue = node.output[0], NO_POOL, []
        while tensor not in outputs and len(readers.get(tensor, [])) == 1:
            reader = readers[tensor][0]
            if _is_plain(reader, "Relu"):
                pass
            elif _is_plain(reader, "MaxPool") and pool is NO_POOL and _pool_vector(reader) is not None:
                pool = _pool_vector(reader)
            else:
                if chainable(reader) and reader.input[0] == tensor:
                    links.append(Link(node, reader, pool, glue))
                break
            glue.append(reader)
            tensor = reader.output[0]
    return links


def _has_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def chained(model: onnx.ModelProto, base_dir: str = "") -> onnx.ModelProto | None:
    """A copy of the lowered `model` with its links in packed bits, or None when it has none (or keeps weights in
    external files, which a session built from bytes could not find)."""
    if _has_external_data(model):
        return None
    links = find_links(model.graph, Constants(model.graph, base_dir))
    if not links:
        return None
    out = copy_model(model)
    graph = out.graph
    by_producer = {id(link.producer): link for link in links}
    by_consumer = {id(link.consumer): link for link in links}
    removed = {id(n) for link in links for n in link.glue}
    gone = {t for link in links for t in [link.producer.output[0]] + [o for n in link.glue for o in n.output]}
    signs_of = {id(link.producer): f"{link.producer.output[0]}/signs" for link in links}
    nodes = []
    for node in model.graph.node:
        if id(node) in removed:
            continue
        if id(node) not in by_producer and id(node) not in by_consumer:
            nodes.append(node)
            continue
        name, tag = node.name or node.output[0], node.output[0]  # output names are unique, node names need not be
        link_in = by_consumer.get(id(node))
        if link_in is None:  # a chain's first layer: its float input packed once
            bits, pool = f"{tag}/input_signs", NO_POOL
            nodes.append(helper.make_node(ops.PACK_SIGNS, [node.input[0]], [bits], name=f"{name}/pack_signs",
                                          domain=ops.DOMAIN))
        else:
            bits, pool = signs_of[id(link_in.producer)], link_in.pool
        pool_init = numpy_helper.from_array(pool, f"{tag}/chain_pool")
        graph.initializer.append(pool_init)
        emits = id(node) in by_producer
        nodes.append(helper.make_node(ops.PACKED_BIT_CONV_SIGNS if emits else ops.PACKED_BIT_CONV,
                                      [bits, *node.input[1:5], pool_init.name],
                                      [signs_of[id(node)] if emits else node.output[0]], name=name,
                                      domain=ops.DOMAIN))
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [vi for vi in graph.value_info if vi.name not in gone]  # a float type on a tensor now gone or bits
    del graph.value_info[:]
    graph.value_info.extend(kept)
    return out
