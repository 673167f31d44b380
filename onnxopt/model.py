"""Load and save models, and look up constant weights.

Everything that touches files lives here: rewrites get a ModelProto and return one.
Saving is atomic (temp file in the target folder, then rename), keeps the input's IR version
and opsets, and only ever adds the custom domain's opset import.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import OnnxoptError, UsageError

# protobuf refuses to serialize a message over 2 GiB: such models need external data
PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_MIN_BYTES = 1024  # smaller tensors stay in the .onnx file
# Constant chains (ConstantOfShape, Cast, ...) are folded only when a rewrite asks for a weight, and only
# up to this size: a 16 KB file can otherwise ask for gigabytes
MAX_FOLDED_BYTES = 1 << 30


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX file (external data included) or raise OnnxoptError saying why not."""
    return load_model_and_files(path)[0]


def load_model_and_files(path: str | os.PathLike) -> tuple[onnx.ModelProto, list[Path]]:
    """The model and the files it was read from (the .onnx and its external-data files): what a save
    must never overwrite."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if path.is_dir():
        raise UsageError(f"{path}: is a directory, expected an .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=False)
        files = [path] + [path.parent / loc for loc in _external_locations(model)]
        onnx.load_external_data_for_model(model, str(path.parent))
    except PermissionError:
        raise OnnxoptError(f"{path}: permission denied") from None
    except Exception as exc:  # protobuf's DecodeError, missing external data, ...
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise OnnxoptError(f"{path}: not a readable ONNX model ({reason})") from None
    if not model.graph.node and not model.graph.output:
        raise OnnxoptError(f"{path}: not an ONNX model (no graph found)")
    check_model(model, what=str(path))
    check_tensors(model, what=str(path))
    return model, files


def _external_locations(model: onnx.ModelProto) -> set[str]:
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    return {ExternalDataInfo(t).location for t in _get_all_tensors(model) if uses_external_data(t)}


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy: rewrites work on their own copy, the caller's model is never modified."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def node_attributes(node: onnx.NodeProto) -> dict:
    """A node's attributes as Python values."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


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


def default_output(input_path: str | os.PathLike, suffix: str) -> Path | None:
    """`model.onnx` → `model.<suffix>.onnx` beside the input (None for a path with no file name)."""
    p = Path(os.path.normpath(input_path))
    return p.with_name(f"{p.stem}.{suffix}.onnx") if p.name not in ("", ".", "..") else None


def _check_target(path: Path, force: bool, protected: list[Path]) -> None:
    """The rules for every file a save replaces: never one we read from, never a non-regular file,
    an existing one only with --force."""
    for source in protected:
        try:
            same = path.exists() and source.exists() and os.path.samefile(path, source)
        except OSError:
            same = False
        if same:
            raise UsageError(f"{path}: is the input model (or one of its data files); write to another path")
    if path.is_dir():
        raise UsageError(f"{path}: is a directory")
    if path.exists() and not path.is_file():
        raise UsageError(f"{path}: exists and is not a regular file; refusing to replace it")
    if path.exists() and not force:
        raise UsageError(f"{path}: exists; pass --force to overwrite")


def check_output(path: str | os.PathLike, *, force: bool = False, protected: list[Path] = ()) -> None:
    """The save rules checked before any work, so a long run (a search, fine-tuning) is not spent on a result
    that could not be written; `save_model` checks again when it writes."""
    _check_target(Path(path), force, list(protected))


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, force: bool = False,
               external_data: bool = False, protected: list[Path] = ()) -> Path:
    """Check and write `model` atomically. External data goes to `<name>.data` beside it; both files
    follow the same rules (`_check_target`), and `protected` (the input's files) are never replaced."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"{folder}: output folder does not exist")
    external_data = external_data or over_protobuf_limit(model)
    data_name = path.name + ".data"
    _check_target(path, force, list(protected))
    if external_data:
        _check_target(folder / data_name, force, list(protected))
    check_model(model, what="output model")
    try:
        tmp_dir = tempfile.mkdtemp(prefix=f".{path.name}.", dir=folder)
    except OSError as exc:
        raise OnnxoptError(f"{folder}: cannot write here ({exc.strerror})") from None
    try:
        tmp_path = Path(tmp_dir) / path.name
        if external_data:
            _save_external(model, tmp_path, data_name)
            os.replace(Path(tmp_dir) / data_name, folder / data_name)
        else:
            onnx.save_model(model, str(tmp_path))
        os.replace(tmp_path, path)
    except OSError as exc:
        raise OnnxoptError(f"{path}: write failed ({exc.strerror or exc}); nothing was written") from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def _save_external(model: onnx.ModelProto, tmp_path: Path, data_name: str) -> None:
    """Write the model with its large tensors in `data_name` beside `tmp_path`.

    Written by hand around onnx's writer because onnx.save_model(save_as_external_data=True) checks
    whether the data file exists relative to the *current directory*, not the model's folder."""
    from onnx.external_data_helper import _get_initializer_tensors, set_external_data

    for tensor in _get_initializer_tensors(model):
        if tensor.data_type == onnx.TensorProto.STRING:
            continue
        if not tensor.HasField("raw_data"):
            array = numpy_helper.to_array(tensor)
            if array.nbytes < EXTERNAL_MIN_BYTES:
                continue
            tensor.raw_data = array.tobytes()
            for name in _TYPED_FIELDS:
                tensor.ClearField(name)
        if len(tensor.raw_data) >= EXTERNAL_MIN_BYTES:
            set_external_data(tensor, data_name)
    onnx.save_model(model, str(tmp_path))
    # writing moved the caller's tensor data out to the file: read it back in
    onnx.load_external_data_for_model(model, str(tmp_path.parent))


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
            return _fold(node, inputs, name)
        except OnnxoptError:
            raise
        except Exception:  # a malformed constant is simply not a known constant
            return None


def _fold(node: onnx.NodeProto, inputs: list[np.ndarray], name: str) -> np.ndarray | None:
    attrs = node_attributes(node)
    if node.op_type == "Constant":
        if len(attrs) != 1:
            return None
        key, value = next(iter(attrs.items()))
        return numpy_helper.to_array(value) if key == "value" else np.array(value)
    if node.op_type == "ConstantOfShape":
        fill = numpy_helper.to_array(attrs["value"]) if "value" in attrs else np.zeros(1, np.float32)
        shape = tuple(int(d) for d in inputs[0])
        size = int(np.prod(shape, dtype=np.float64)) * fill.dtype.itemsize
        if size > MAX_FOLDED_BYTES:
            raise OnnxoptError(f"constant '{name}' (ConstantOfShape {list(shape)}) would take {size:,} bytes; "
                               f"onnxopt folds constants up to {MAX_FOLDED_BYTES:,} bytes")
        return np.full(shape, fill.reshape(-1)[0], dtype=fill.dtype)
    if node.op_type == "Identity":
        return inputs[0]
    if node.op_type == "Cast":
        return inputs[0].astype(onnx.helper.tensor_dtype_to_np_dtype(attrs["to"]))
    if node.op_type == "Reshape":
        return inputs[0].reshape(tuple(int(d) for d in inputs[1]))
    return np.transpose(inputs[0], attrs.get("perm"))


def static_shape(value_info: onnx.ValueInfoProto) -> list[int | str | None]:
    """Dims of a value: ints where known (0 included: an empty axis), the symbol name or None elsewhere."""
    dims = []
    for d in value_info.type.tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value >= 0:
            dims.append(d.dim_value)
        else:
            dims.append(d.dim_param or None)
    return dims


# sizes given for graph inputs (--input-shape), {name: dims}: read by shape inference and by random inputs while
# a command runs (pipeline.run sets them), so every step and check sees the same sizes without the model's own
# declaration changing
INPUT_SHAPES: contextvars.ContextVar[dict | None] = contextvars.ContextVar("input_shapes", default=None)


@contextlib.contextmanager
def input_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]):
    """--input-shape for the duration of a command: checked against `model`, then seen by shape inference and
    random inputs."""
    check_input_shapes(model, shapes)
    token = INPUT_SHAPES.set(shapes)
    try:
        yield
    finally:
        INPUT_SHAPES.reset(token)


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
    given = INPUT_SHAPES.get() or {}
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


def infer_shapes(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Value infos by name after onnx shape inference (best effort: unknown stays unknown)."""
    skeleton = _skeleton(model)
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
    return _atomic_write(path, force, ".npz", lambda f: np.savez(f, **arrays))


def atomic_write_text(text: str, path: str | os.PathLike, *, force: bool = True) -> Path:
    """A text file (an HTML report) written atomically, under the same rules as a model."""
    return _atomic_write(path, force, ".tmp", lambda f: f.write(text.encode()))


def _atomic_write(path: str | os.PathLike, force: bool, suffix: str, write) -> Path:
    path = Path(path)
    _check_target(path, force, [])
    folder = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=folder)
    except OSError as exc:
        raise OnnxoptError(f"{folder}: cannot write here ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the file is the user's, as a plain open would make it
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OnnxoptError(f"{path}: write failed ({exc.strerror or exc}); nothing was written") from None
    return path
