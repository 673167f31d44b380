"""Feed checks for sessions that run com.onnxopt ops: a bad feed raises OnnxoptError in Python before
onnxruntime starts, because an exception inside a custom op would abort the process.

Checked per `run`: each input's dtype and known dims against the graph, then, for the feed's actual
shapes, every BinaryConv/BitConv input (symbolic dims resolved by onnx shape inference on a shape twin of
the graph, each custom op standing in as the Conv of the same geometry): channels and a non-empty output.
"""
from __future__ import annotations

import numpy as np
import onnx

from ..errors import OnnxoptError
from ..graph import schemas as ops
from ..graph.constants import Constants
from ..graph.nodes import copy_model
from ..graph.shapes import infer_shapes, static_shape
from ..kernels.geometry import Geometry


def graph_inputs(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Inputs a caller must feed (initializers listed as inputs are not)."""
    inits = {t.name for t in model.graph.initializer}
    return {i.name: i for i in model.graph.input if i.name not in inits}


def expected(vi: onnx.ValueInfoProto) -> tuple:
    """(numpy dtype or None, dims with None where any size goes, or None for any rank) of a graph input."""
    tt = vi.type.tensor_type
    want = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)) if tt.elem_type else None
    if not tt.HasField("shape"):
        return want, None
    return want, [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]


def check_feed(name: str, array: np.ndarray, vi: onnx.ValueInfoProto | tuple, source: str = "feed") -> None:
    """Raise OnnxoptError unless `array` fits graph input `vi` (or its `expected` tuple, computed once)."""
    want, dims = expected(vi) if isinstance(vi, onnx.ValueInfoProto) else vi
    if want is not None and array.dtype != want:
        raise OnnxoptError(f"{source}: input '{name}' has dtype {array.dtype}, the model expects {want}")
    if dims is not None and (array.ndim != len(dims) or
                             any(d is not None and d != s for d, s in zip(dims, array.shape))):
        shown = ["?" if d is None else str(d) for d in dims]
        raise OnnxoptError(f"{source}: input '{name}' has shape {list(array.shape)}, "
                           f"the model expects [{', '.join(shown)}]")


class CustomOpShapes:
    """For a model with com.onnxopt ops: which feed shapes each custom op can take."""

    def __init__(self, model: onnx.ModelProto, constants: Constants):
        self.layers = []  # (node name, op type, input tensor, weight, geometry)
        twin = copy_model(model)
        for node in twin.graph.node:  # constants already passed ops.check_custom_nodes (session creation)
            if ops.is_custom(node) and node.op_type in ops.OP_TYPES:
                w, geometry = constants.get(node.input[1]), constants.get(node.input[4])
                self.layers.append((node.name, node.op_type, node.input[0], w, geometry))
                out_channels = np.shape(constants.get(node.input[2]))[-1]  # α: [O], or [levels, O] for multi-bit
                node.CopyFrom(_conv_stand_in(node, w, geometry, out_channels, twin.graph))
        self.twin = twin
        self._checked: set[tuple] = set()

    def check(self, feeds: dict[str, np.ndarray]) -> None:
        key = tuple(sorted((k, tuple(np.shape(v))) for k, v in feeds.items()))
        if not self.layers or key in self._checked:
            return
        shapes = self._shapes(feeds)
        for name, op_type, x, w, geometry in self.layers:
            shape = shapes.get(x)
            problem = ops.input_problem(op_type, shape, w, geometry) if shape else None
            if problem:
                raise OnnxoptError(f"{op_type} '{name}' cannot run on this feed: {problem}")
        self._checked.add(key)

    def _shapes(self, feeds) -> dict[str, list]:
        model = copy_model(self.twin)
        for vi in model.graph.input:
            if vi.name in feeds:
                dims = vi.type.tensor_type.shape.dim
                del dims[:]
                for d in np.shape(feeds[vi.name]):
                    dims.add().dim_value = int(d)
        return {name: static_shape(vi) for name, vi in infer_shapes(model).items()
                if vi.type.tensor_type.HasField("shape")}


def _conv_stand_in(node: onnx.NodeProto, w: np.ndarray, geometry: np.ndarray, out_channels: int,
                   graph) -> onnx.NodeProto:
    """A float Conv with the op's geometry and a weight of the right shape (declared as a graph input:
    inference needs its shape only)."""
    g = Geometry.decode(geometry[:11])
    _, kh, kw = ops.kernel_shape(node.op_type, w)
    shape = [out_channels, g.channels] + ([kh, kw] if g.spatial_rank == 2 else [kw])
    weight = f"{node.name or node.output[0]}/shape_stand_in"
    graph.input.append(onnx.helper.make_tensor_value_info(weight, onnx.TensorProto.FLOAT, shape))
    return onnx.helper.make_node("Conv", [node.input[0], weight], list(node.output), name=node.name,
                                 **g.conv_attributes())
