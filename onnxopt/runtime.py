"""onnxruntime sessions that can run onnxopt's custom ops.

`session(model)` is what users call; `session_options()` gives SessionOptions with the
com.onnxopt ops registered, for code that builds its own InferenceSession. Registration happens
once per process (onnxruntime-extensions refuses a second registration of the same op).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

from .errors import OnnxoptError
from .model import CUSTOM_DOMAIN


def _uses_custom_ops(model: onnx.ModelProto) -> bool:
    return any(n.domain == CUSTOM_DOMAIN for n in model.graph.node)


def _plain_options(optimize: bool, threads: int | None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3  # errors only: onnxruntime's warnings are not the user's business here
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    return so


def session_options(*, optimize: bool = True, threads: int | None = None):
    """onnxruntime.SessionOptions with the com.onnxopt custom ops registered."""
    from . import ops  # registers the ops with onnxruntime-extensions on first import

    so = _plain_options(optimize, threads)
    so.register_custom_ops_library(ops.library_path())
    # numba's kernel threads and onnxruntime's intra-op threads share the cores: onnxruntime's threads
    # spinning after a float op starve the next bit-packed conv (VGG benchmark, batch 8: 1.2x → 2.5x without it)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def session(model: str | os.PathLike | onnx.ModelProto, *, optimize: bool = True, threads: int | None = None):
    """An onnxruntime.InferenceSession for a plain, transformed or lowered model."""
    import tempfile

    from .model import over_protobuf_limit, save_model

    if isinstance(model, (str, os.PathLike)):
        return _session(str(model), onnx.load(str(model), load_external_data=False), optimize, threads)
    if not over_protobuf_limit(model):
        return _session(model.SerializeToString(), model, optimize, threads)
    # over protobuf's 2 GiB: a temporary copy with external data, read while the session is built
    with tempfile.TemporaryDirectory(prefix="onnxopt-") as folder:
        path = Path(folder) / "model.onnx"
        save_model(model, path, external_data=True)
        return _session(str(path), model, optimize, threads)


def _session(source, proto: onnx.ModelProto, optimize: bool, threads: int | None):
    import onnxruntime as ort

    if _uses_custom_ops(proto):
        so = session_options(optimize=optimize, threads=threads)
    else:
        so = _plain_options(optimize, threads)
    try:
        sess = ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise OnnxoptError(f"onnxruntime cannot load the model: {str(exc).splitlines()[0]}") from None
    if _uses_custom_ops(proto):
        from .ops import guard_session

        guard_session(sess, proto)
    return sess


def load_feeds(path: str | os.PathLike, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Arrays keyed by graph input name from an .npz; a file with one array feeds a one-input model."""
    path = Path(path)
    if not path.is_file():
        raise OnnxoptError(f"{path}: no such data file")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as exc:
        raise OnnxoptError(f"{path}: not a readable .npz file ({exc})") from None
    inputs = graph_inputs(model)
    feeds = {name: arrays[name] for name in inputs if name in arrays}
    if not feeds and len(inputs) == 1 and len(arrays) >= 1:
        unnamed = [k for k in arrays if k not in ("label", "labels")]
        if len(unnamed) == 1:
            feeds = {next(iter(inputs)): arrays[unnamed[0]]}
    missing = [n for n in inputs if n not in feeds]
    if missing:
        raise OnnxoptError(f"{path}: no array for input(s) {', '.join(missing)} (has: {', '.join(arrays) or 'none'})")
    for name, vi in inputs.items():
        check_feed(name, feeds[name], vi, source=str(path))
    return feeds


def graph_inputs(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Inputs a caller must feed (initializers listed as inputs are not)."""
    inits = {t.name for t in model.graph.initializer}
    return {i.name: i for i in model.graph.input if i.name not in inits}


def check_feed(name: str, array: np.ndarray, vi: onnx.ValueInfoProto, source: str = "feed") -> None:
    tt = vi.type.tensor_type
    want = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type) if tt.elem_type else None
    if want is not None and array.dtype != want:
        raise OnnxoptError(f"{source}: input '{name}' has dtype {array.dtype}, the model expects {np.dtype(want)}")
    if tt.HasField("shape"):
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]
        if array.ndim != len(dims) or any(d is not None and d != s for d, s in zip(dims, array.shape)):
            shown = ["?" if d is None else str(d) for d in dims]
            raise OnnxoptError(f"{source}: input '{name}' has shape {list(array.shape)}, "
                               f"the model expects [{', '.join(shown)}]")


def random_feeds(model: onnx.ModelProto, samples: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float inputs; a symbolic first dim becomes `samples`, other symbolic dims need --data."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, vi in graph_inputs(model).items():
        tt = vi.type.tensor_type
        dims = []
        for i, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(d.dim_value)
            elif i == 0:
                dims.append(samples)
            else:
                raise OnnxoptError(f"input '{name}' has an unknown dim {i} ('{d.dim_param or '?'}'): pass --data")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if not np.issubdtype(dtype, np.floating):
            raise OnnxoptError(f"input '{name}' is {np.dtype(dtype)}: random inputs are floats only, pass --data")
        feeds[name] = rng.standard_normal(dims).astype(dtype)
    return feeds


def run(model, feeds: dict[str, np.ndarray], *, optimize: bool = True) -> dict[str, np.ndarray]:
    sess = session(model, optimize=optimize)
    names = [o.name for o in sess.get_outputs()]
    try:
        return dict(zip(names, sess.run(names, feeds)))
    except Exception as exc:
        raise OnnxoptError(f"onnxruntime failed to run the model: {str(exc).splitlines()[0]}") from None


def compare_outputs(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict:
    """Both models in onnxruntime, graph optimizations off: max abs / rel difference per output."""
    a = run(reference, feeds, optimize=False)
    b = run(candidate, feeds, optimize=False)
    samples = len(next(iter(feeds.values()))) if feeds else 0
    outputs = output_differences(a, b)
    return {"samples": samples, "outputs": outputs,
            "max_rel": max((v["max_rel"] for v in outputs.values()), default=0.0)}


def compare_models(a: onnx.ModelProto, b: onnx.ModelProto, data_path, *, labels: str | None = None) -> dict:
    """A vs B on the inputs in `data_path`: top-1 agreement, accuracy (with labels), differences, latency."""
    import statistics
    import time

    feeds = load_feeds(data_path, a)
    with np.load(data_path, allow_pickle=False) as d:
        key = labels or ("label" if "label" in d.files else None)
        if labels and labels not in d.files:
            raise OnnxoptError(f"{data_path}: no array '{labels}' for --labels (has: {', '.join(d.files)})")
        y = d[key] if key else None
    result = {"samples": len(next(iter(feeds.values())))}
    outs = {}
    for tag, model in (("A", a), ("B", b)):
        sess = session(model)
        names = [o.name for o in sess.get_outputs()]
        try:
            values = sess.run(names, feeds)
        except Exception as exc:
            raise OnnxoptError(f"{tag}: onnxruntime failed to run the model: {str(exc).splitlines()[0]}") from None
        times = []
        for _ in range(5):
            t = time.perf_counter()
            sess.run(names, feeds)
            times.append((time.perf_counter() - t) * 1e3)
        outs[tag] = dict(zip(names, values))
        first = values[0]
        acc = None
        if y is not None and first.ndim == 2 and len(y) == len(first):
            acc = float((first.argmax(1) == y).mean())
        result[tag] = {"accuracy": acc, "latency_ms": statistics.median(times)}
    first_name = next(iter(outs["A"]))
    if first_name not in outs["B"]:
        raise OnnxoptError(f"B has no output '{first_name}'")
    pa, pb = outs["A"][first_name], outs["B"][first_name]
    result["top1_agreement"] = float((pa.argmax(-1) == pb.argmax(-1)).mean()) if pa.ndim >= 2 else None
    result["outputs"] = output_differences(outs["A"], outs["B"])
    return result


def output_differences(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> dict:
    """Max abs difference and max abs difference / max |reference| per output both sides have."""
    diffs = {}
    for name, ref in reference.items():
        got = candidate.get(name)
        if got is None or got.shape != ref.shape:
            continue
        diff = float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64)))) if ref.size else 0.0
        scale = float(np.max(np.abs(ref))) if ref.size else 0.0
        diffs[name] = {"max_abs": diff, "max_rel": diff / scale if scale else diff}
    return diffs
