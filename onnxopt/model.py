"""Load and save models, and look up constant weights.

Everything that touches files lives here: rewrites get a ModelProto and return one.
Saving is atomic (temp file in the target folder, then rename), keeps the input's IR version
and opsets, and only ever adds the custom domain's opset import.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import OnnxoptError, UsageError

CUSTOM_DOMAIN = "com.onnxopt"
CUSTOM_OPSET = 1
# protobuf refuses to serialize a message over 2 GiB: such models need external data
PROTOBUF_LIMIT = 2**31 - 1


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX file (external data included) or raise OnnxoptError saying why not."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if path.is_dir():
        raise UsageError(f"{path}: is a directory, expected an .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except PermissionError:
        raise OnnxoptError(f"{path}: permission denied") from None
    except Exception as exc:  # protobuf's DecodeError, missing external data, ...
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise OnnxoptError(f"{path}: not a readable ONNX model ({reason})") from None
    if not model.graph.node and not model.graph.output:
        raise OnnxoptError(f"{path}: not an ONNX model (no graph found)")
    check_model(model, what=str(path))
    check_tensors(model, what=str(path))
    return model


def over_protobuf_limit(model: onnx.ModelProto) -> bool:
    """True for a model protobuf cannot serialize in one piece (it must be saved with external data)."""
    try:
        return model.ByteSize() > PROTOBUF_LIMIT
    except Exception:  # some protobuf builds refuse even to measure a message over 2 GiB
        return True


def check_model(model: onnx.ModelProto, what: str = "model") -> None:
    """onnx.checker, with its message turned into one line."""
    try:
        if over_protobuf_limit(model):
            return  # the checker cannot take >2 GiB in memory; save_model checks the file instead
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise OnnxoptError(f"{what}: fails onnx.checker: {_one_line(str(exc))}") from None


def _one_line(message: str, limit: int = 300) -> str:
    """A multi-line library message as one line (the checker splits its sentences over lines), the
    ==> Context: trailer dropped."""
    text = " ".join(message.split("==> Context:")[0].split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def default_output(input_path: str | os.PathLike, suffix: str) -> Path:
    """`model.onnx` → `model.<suffix>.onnx` beside the input."""
    p = Path(input_path)
    return p.with_name(f"{p.stem}.{suffix}.onnx")


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, force: bool = False,
               external_data: bool = False) -> Path:
    """Check and write `model` atomically. External data goes to `<name>.data` beside it."""
    path = Path(path)
    if path.exists() and not force:
        raise UsageError(f"{path}: exists; pass --force to overwrite")
    if path.is_dir():
        raise UsageError(f"{path}: is a directory")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"{folder}: output folder does not exist")
    external_data = external_data or over_protobuf_limit(model)
    check_model(model, what="output model")
    try:
        tmp_dir = tempfile.mkdtemp(prefix=f".{path.name}.", dir=folder)
    except OSError as exc:
        raise OnnxoptError(f"{folder}: cannot write here ({exc.strerror})") from None
    data_name = path.name + ".data"
    try:
        tmp_path = Path(tmp_dir) / path.name
        if external_data:
            onnx.save_model(model, str(tmp_path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
            # saving converted the caller's tensors to external references: read them back in
            onnx.load_external_data_for_model(model, tmp_dir)
            os.replace(Path(tmp_dir) / data_name, folder / data_name)
        else:
            onnx.save_model(model, str(tmp_path))
        os.replace(tmp_path, path)
    except OSError as exc:
        raise OnnxoptError(f"{path}: write failed ({exc.strerror or exc}); nothing was written") from None
    finally:
        for leftover in Path(tmp_dir).glob("*"):
            leftover.unlink()
        os.rmdir(tmp_dir)
    return path


def with_custom_domain(model: onnx.ModelProto) -> None:
    """Add the com.onnxopt opset import (once); IR version and other opsets stay as they are."""
    if not any(o.domain == CUSTOM_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(CUSTOM_DOMAIN, CUSTOM_OPSET))


def constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Every tensor of the graph whose value is known without running it.

    Sources: initializers that are not overridable graph inputs, `Constant` nodes, and
    `ConstantOfShape` / `Identity` / `Cast` / `Reshape` chains over those (exporters emit all of them).
    """
    # Initializers listed among the graph inputs (IR < 4, or exported with keep_initializers_as_inputs)
    # are treated as weights too, as onnxruntime's own graph optimizers do.
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        try:
            folded = _fold(node, values)
        except Exception:  # a malformed constant is simply not a known constant
            folded = None
        if folded is not None and node.output:
            values[node.output[0]] = folded
    return values


def _fold(node: onnx.NodeProto, values: dict[str, np.ndarray]) -> np.ndarray | None:
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Constant":
        attr = node.attribute[0] if node.attribute else None
        if attr is None:
            return None
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        return np.array(onnx.helper.get_attribute_value(attr))
    inputs = [values.get(i) for i in node.input]
    if any(v is None for v in inputs):
        return None
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "ConstantOfShape":
        fill = numpy_helper.to_array(attrs["value"]) if "value" in attrs else np.zeros(1, np.float32)
        return np.full(tuple(int(d) for d in inputs[0]), fill.reshape(-1)[0], dtype=fill.dtype)
    if node.op_type == "Identity":
        return inputs[0]
    if node.op_type == "Cast":
        return inputs[0].astype(onnx.helper.tensor_dtype_to_np_dtype(attrs["to"]))
    if node.op_type == "Reshape":
        return inputs[0].reshape(tuple(int(d) for d in inputs[1]))
    if node.op_type == "Transpose":
        return np.transpose(inputs[0], attrs.get("perm"))
    return None


def static_shape(value_info: onnx.ValueInfoProto) -> list[int | str | None]:
    """Dims of a value: ints where known (0 included: an empty axis), the symbol name or None elsewhere."""
    dims = []
    for d in value_info.type.tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value >= 0:
            dims.append(d.dim_value)
        else:
            dims.append(d.dim_param or None)
    return dims


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with its large initializers replaced by typed graph inputs: shape inference only needs
    their shapes, and serializing gigabytes of weights for it would dominate the run."""
    skeleton = onnx.ModelProto()
    skeleton.ir_version = max(model.ir_version, 4)  # IR 4+ lets initializers be absent from inputs
    skeleton.opset_import.extend(model.opset_import)
    skeleton.graph.name = model.graph.name
    skeleton.graph.node.extend(model.graph.node)
    skeleton.graph.output.extend(model.graph.output)
    # the file's own value_info is left out: it is a hint that may be stale, and inference redoes it
    listed = {i.name for i in model.graph.input}
    skeleton.graph.input.extend(model.graph.input)
    for t in model.graph.initializer:
        if t.name in listed:
            continue
        if np.prod(t.dims, dtype=np.int64) <= 64:  # small ones may be shapes that inference reads
            skeleton.graph.initializer.append(t)
        else:
            skeleton.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return skeleton


def infer_shapes(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Value infos by name after onnx shape inference (best effort: unknown stays unknown)."""
    skeleton = _skeleton(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton)
    except Exception:
        inferred = skeleton
    g = inferred.graph
    return {v.name: v for v in list(g.input) + list(g.value_info) + list(g.output)}


_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


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
    count = sum(len(getattr(t, f)) for f in _TYPED_FIELDS)
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
        onnx.shape_inference.infer_shapes(_skeleton(model), check_type=True)
    except onnx.shape_inference.InferenceError as exc:
        first = str(exc).strip().splitlines()[0]
        raise OnnxoptError(f"{what}: inconsistent types: {first}") from None
    except Exception:
        pass  # inference itself gave up (unknown ops, exotic graphs): onnxruntime will judge


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


def atomic_save_npz(arrays: dict[str, np.ndarray], path: str | os.PathLike, *, force: bool = False) -> Path:
    path = Path(path)
    if path.exists() and not force:
        raise UsageError(f"{path}: exists; pass --force to overwrite")
    folder = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=folder)
    except OSError as exc:
        raise OnnxoptError(f"{folder}: cannot write here ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OnnxoptError(f"{path}: write failed ({exc.strerror or exc}); nothing was written") from None
    return path
