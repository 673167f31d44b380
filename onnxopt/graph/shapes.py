"""Shapes: onnx shape inference over a weight-free skeleton of the graph, the sizes a user gives for symbolic
inputs (`--input-shape`), and the load-time check that tensors hold what their dims say.
"""
from __future__ import annotations

import numpy as np
import onnx

from ..errors import OnnxoptError, UsageError


def static_shape(value_info: onnx.ValueInfoProto) -> list[int | str | None]:
    """Dims of a value: ints where known (0 included: an empty axis), the symbol name or None elsewhere."""
    dims = []
    for d in value_info.type.tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value >= 0:
            dims.append(d.dim_value)
        else:
            dims.append(d.dim_param or None)
    return dims


def check_input_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> None:
    """--input-shape names graph inputs, with their rank, agreeing with the dims the model fixes."""
    inputs = {vi.name: vi for vi in model.graph.input} if shapes else {}
    for name, dims in shapes.items():
        vi = inputs.get(name)
        if vi is None:
            raise UsageError(f"--input-shape '{name}': no such graph input (inputs: {', '.join(inputs)})")
        declared = static_shape(vi)
        if len(declared) != len(dims):
            raise UsageError(f"--input-shape '{name}': {len(dims)} dims given, the input has {len(declared)}")
        for i, (d, given) in enumerate(zip(declared, dims)):
            if isinstance(d, int) and d != given:
                raise UsageError(f"--input-shape '{name}': dim {i} is fixed at {d} in the model, {given} given")


def inference_skeleton(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None) -> onnx.ModelProto:
    """The graph with its large initializers replaced by typed graph inputs: shape inference only needs
    their shapes, and serializing gigabytes of weights for it would dominate the run. `shapes`: sizes for
    symbolic inputs (--input-shape), seen by inference while the model keeps its own declaration."""
    skeleton = onnx.ModelProto()
    skeleton.ir_version = max(model.ir_version, 4)  # IR 4+ lets initializers be absent from inputs
    skeleton.opset_import.extend(model.opset_import)
    skeleton.graph.name = model.graph.name
    skeleton.graph.node.extend(model.graph.node)
    skeleton.graph.output.extend(model.graph.output)
    # the file's own value_info is left out: it is a hint that may be stale, and inference redoes it
    listed = {i.name for i in model.graph.input}
    given = shapes or {}
    for vi in model.graph.input:
        if vi.name in given:  # --input-shape: inference and FLOPs see these sizes; the model keeps its own
            vi = onnx.helper.make_tensor_value_info(vi.name, vi.type.tensor_type.elem_type, list(given[vi.name]))
        skeleton.graph.input.append(vi)
    for t in model.graph.initializer:
        if t.name in listed:
            continue
        if np.prod(t.dims, dtype=np.int64) <= 64:  # small ones may be shapes that inference reads
            skeleton.graph.initializer.append(t)
        else:
            skeleton.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return skeleton


def infer_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None
                 ) -> dict[str, onnx.ValueInfoProto]:
    """Value infos by name after onnx shape inference (best effort: unknown stays unknown)."""
    skeleton = inference_skeleton(model, shapes)
    inferred = skeleton
    # data propagation follows Shape → Gather → Concat → Reshape chains (legacy torch exports compute their
    # reshapes that way, and without it a token MLP's rows per sample stay unknown)
    for propagate in (True, False):
        try:
            inferred = onnx.shape_inference.infer_shapes(skeleton, data_prop=propagate)
            break
        except Exception:
            continue
    g = inferred.graph
    return {v.name: v for v in list(g.input) + list(g.value_info) + list(g.output)}


TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


# element types stored several to a byte: their raw_data length does not count elements
_PACKED_TYPES = {getattr(onnx.TensorProto, name) for name in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")
                 if hasattr(onnx.TensorProto, name)}


def _stored_elements(t: onnx.TensorProto) -> int | None:
    """How many elements a tensor's data holds (None: external, packed or an unknown element type)."""
    if t.data_location == onnx.TensorProto.EXTERNAL or t.data_type in _PACKED_TYPES:
        return None
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
    except (KeyError, ValueError):
        return None
    if t.HasField("raw_data"):
        return None if t.data_type == onnx.TensorProto.STRING else len(t.raw_data) // dtype.itemsize
    count = sum(len(getattr(t, f)) for f in TYPED_FIELDS)
    if t.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128):
        count //= 2
    return count


def check_tensors(model: onnx.ModelProto, what: str = "model") -> None:
    """Each weight holds as many elements as its dims say, and types agree along the graph: the two
    faults onnx.checker lets through that would make a rewrite (or onnxruntime) fail later."""
    tensors = list(model.graph.initializer) + [a.t for n in model.graph.node if n.op_type == "Constant"
                                               for a in n.attribute if a.type == onnx.AttributeProto.TENSOR]
    for t in tensors:
        stored, declared = _stored_elements(t), int(np.prod(t.dims, dtype=np.int64))
        if stored is not None and stored != declared:
            raise OnnxoptError(f"{what}: tensor '{t.name}' holds {stored} values but its shape "
                               f"{list(t.dims)} needs {declared}")
    try:
        onnx.shape_inference.infer_shapes(inference_skeleton(model), check_type=True)
    except onnx.shape_inference.InferenceError as exc:
        first = str(exc).strip().splitlines()[0]
        raise OnnxoptError(f"{what}: inconsistent types: {first}") from None
    except Exception:
        pass  # inference itself gave up (unknown ops, exotic graphs): onnxruntime will judge
