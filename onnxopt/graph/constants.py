"""Constant weights: initializers, `Constant` nodes and foldable chains over them, computed on request."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import OnnxoptError
from .nodes import copy_model, node_attributes, subgraphs

# Constant chains (ConstantOfShape, Cast, ...) are folded only when a rewrite asks for a weight, and only up to
# this many bytes in all (every intermediate counts: a 1.3 KB file of ConstantOfShape 4096² and 40 Casts took
# 4.1 GB when each fold was bounded alone)
MAX_FOLDED_BYTES = 1 << 30


class Constants:
    """The tensors of a graph whose value is known without running it, computed on request.

    Sources: initializers (also those listed among the graph inputs, as onnxruntime's own optimizers
    treat them), `Constant` nodes, and `ConstantOfShape` / `Identity` / `Cast` / `Reshape` / `Transpose`
    chains over those (exporters emit all of them). Nothing is folded until asked for, so constants that
    feed no weight cost nothing; a fold that would exceed MAX_FOLDED_BYTES is refused.
    """

    FOLDABLE = ("Constant", "ConstantOfShape", "Identity", "Cast", "Reshape", "Transpose")

    def __init__(self, graph: onnx.GraphProto, base_dir: str = ""):
        self._base_dir = base_dir  # where external data lives, for a graph loaded without it
        self._initializers = {t.name: t for t in graph.initializer}
        self._producers = {o: n for n in graph.node for o in n.output if n.op_type in self.FOLDABLE
                           and n.domain in ("", "ai.onnx")}
        self._values: dict[str, np.ndarray | None] = {}
        self._folded_bytes = 0  # what the folds made so far (initializers and Constant values are the file's)

    def get(self, name: str) -> np.ndarray | None:
        if name not in self._values:
            self._values[name] = self._compute(name, depth=0)
        return self._values[name]

    def _compute(self, name: str, depth: int) -> np.ndarray | None:
        if name in self._initializers:
            return numpy_helper.to_array(self._initializers[name], self._base_dir)
        node = self._producers.get(name)
        if node is None or depth > 64 or node.output[0] != name:
            return None
        inputs = []
        for i in node.input:
            value = self._values[i] if i in self._values else self._compute(i, depth + 1)
            self._values[i] = value
            if value is None:
                return None
            inputs.append(value)
        try:
            return _fold(node, inputs, lambda size: self._charge(size, name, node))
        except OnnxoptError:
            raise
        except Exception:  # a malformed constant is simply not a known constant
            return None

    def _charge(self, size: int, name: str, node: onnx.NodeProto) -> None:
        """Count a fold's output against MAX_FOLDED_BYTES before it is made."""
        self._folded_bytes += size
        if self._folded_bytes > MAX_FOLDED_BYTES:
            raise OnnxoptError(f"constant '{name}' ({node.op_type}) would bring the folded constants to "
                               f"{self._folded_bytes:,} bytes; onnxopt folds constants up to {MAX_FOLDED_BYTES:,} "
                               "bytes in all")


def _fold(node: onnx.NodeProto, inputs: list[np.ndarray], charge) -> np.ndarray | None:
    """The value of `node` over known `inputs`; `charge(bytes)` is called before each allocation."""
    attrs = node_attributes(node)
    if node.op_type == "Constant":
        if len(attrs) != 1:
            return None
        key, value = next(iter(attrs.items()))
        return numpy_helper.to_array(value) if key == "value" else np.array(value)
    if node.op_type == "ConstantOfShape":
        fill = numpy_helper.to_array(attrs["value"]) if "value" in attrs else np.zeros(1, np.float32)
        shape = tuple(int(d) for d in inputs[0])
        charge(int(np.prod(shape, dtype=np.float64)) * fill.dtype.itemsize)
        return np.full(shape, fill.reshape(-1)[0], dtype=fill.dtype)
    if node.op_type == "Identity":
        return inputs[0]
    if node.op_type == "Cast":
        to = onnx.helper.tensor_dtype_to_np_dtype(attrs["to"])
        charge(inputs[0].size * to.itemsize)
        return inputs[0].astype(to)
    if node.op_type == "Reshape":
        return inputs[0].reshape(tuple(int(d) for d in inputs[1]))
    return np.transpose(inputs[0], attrs.get("perm"))


def constants_as_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose `Constant` tensors (exporters such as Paddle's keep every weight in one) are
    initializers, in every graph and control-flow body: every pass then sees a weight the same way, a rewrite
    that replaces a weight leaves nothing behind (the old initializer is dropped once unread), and onnxruntime's
    quantizer, which expects initializer weights, can read them. The values are the same bytes the file held."""
    out = copy_model(model)
    _convert(out.graph, list_as_input=out.ir_version < 4)  # before IR 4 an initializer is also a graph input
    return out


def _convert(graph: onnx.GraphProto, list_as_input: bool) -> None:
    outputs = {o.name for o in graph.output}
    kept = []
    for node in graph.node:
        for sub in subgraphs(node):
            _convert(sub, list_as_input)
        value = [a.t for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR]
        # only a tensor-valued Constant whose output is not itself a graph output (those stay nodes)
        if (node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.attribute) != 1
                or not value or node.output[0] in outputs or value[0].data_location == onnx.TensorProto.EXTERNAL):
            kept.append(node)
            continue
        tensor = graph.initializer.add()
        tensor.CopyFrom(value[0])
        tensor.name = node.output[0]
        if list_as_input:
            graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    if len(kept) != len(graph.node):
        del graph.node[:]
        graph.node.extend(kept)
