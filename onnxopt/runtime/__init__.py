"""onnxruntime sessions that can run onnxopt's custom ops, and `run`: a model's outputs on feeds.

`session(model)` is what users call: a guarded InferenceSession that checks feeds before a custom op
can see them. `session_options()` gives SessionOptions with the com.onnxopt ops registered, for code
that builds its own InferenceSession (registration happens there, explicitly, once per process).
Serving code that needs only the native library (`native.library_path()`) imports nothing heavy: onnx,
numba and the graph code load when a function here needs them (a new process reaches its first result sooner).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import OnnxoptError
from . import native

if TYPE_CHECKING:
    import numpy as np
    import onnx


def _uses_custom_ops(model: onnx.ModelProto) -> bool:
    from ..graph import schemas as ops

    return any(ops.is_custom(n) for n in model.graph.node)


def _plain_options(optimize: bool, threads: int | None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3  # errors only: onnxruntime's warnings are not the user's business here
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    return so


def _custom_op_types(graph: onnx.GraphProto) -> set[str]:
    """The com.onnxopt op types in `graph` and its If/Loop/Scan bodies."""
    import onnx

    from ..graph import schemas as ops

    found = set()
    for node in graph.node:
        if ops.is_custom(node):
            found.add(node.op_type)
        for attribute in node.attribute:
            for body in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs:
                found |= _custom_op_types(body)
    return found


def custom_op_library(model: onnx.ModelProto | None = None) -> str:
    """The custom-op library a session for `model` registers: the native one (runtime/native: C, no Python per
    call) when every com.onnxopt op in `model` is a lowered one and it was built at install, else the PyOp
    bridge's, which serves every op (also when no model is given)."""
    from ..graph import schemas as ops

    used = _custom_op_types(model.graph) if model is not None else None
    if used is not None and used <= set(ops.PACKED + ops.CHAINED):
        found = native.library_path()
        if found is not None:
            return found
        _warn_once(f"onnxopt: warning: lowered layers run on the {native.path()}")
    from .pyop import register

    return register()


@functools.cache
def _warn_once(line: str) -> None:
    import sys

    print(line, file=sys.stderr)


def session_options(*, optimize: bool = True, threads: int | None = None, model: onnx.ModelProto | None = None):
    """onnxruntime.SessionOptions with the com.onnxopt custom ops registered (`custom_op_library(model)`)."""
    so = _plain_options(optimize, threads)
    library = custom_op_library(model)
    so.register_custom_ops_library(library)
    if library != native.library_path():
        # the PyOp bridge runs numba's own kernel threads beside onnxruntime's: onnxruntime's threads spinning after
        # a float op starve the next bit-packed conv (VGG benchmark, batch 8: 1.2x → 2.5x without it). The native
        # library runs on onnxruntime's pool itself, so its sessions keep onnxruntime's defaults.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def session(model: str | os.PathLike | onnx.ModelProto, *, optimize: bool = True, threads: int | None = None,
            chain: bool = True):
    """An onnxruntime.InferenceSession for a plain, transformed or lowered model. On the native library, `chain` runs
    BitConv → Relu/MaxPool → BitConv links in packed bits (runtime/chains.py: same outputs, bit for bit)."""
    import tempfile

    import onnx

    from ..graph.io import over_protobuf_limit, save_model

    if isinstance(model, (str, os.PathLike)):
        proto = onnx.load(str(model), load_external_data=False)  # the session reads the weights itself
        return _session(str(model), proto, optimize, threads, chain, base_dir=str(Path(model).parent))
    if not over_protobuf_limit(model):
        return _session(model.SerializeToString(), model, optimize, threads, chain)
    # over protobuf's 2 GiB: a temporary copy with external data, read while the session is built
    with tempfile.TemporaryDirectory(prefix="onnxopt-") as folder:
        path = Path(folder) / "model.onnx"
        save_model(model, path, external_data=True)
        return _session(str(path), model, optimize, threads, chain=False)


def _chained(proto: onnx.ModelProto, base_dir: str) -> onnx.ModelProto | None:
    """The model with its BitConv links in packed bits, when it has some and the native library is here (PyOp has
    no chain ops), else None."""
    from . import chains

    if native.library_path() is None:
        return None
    return chains.chained(proto, base_dir)


def _session(source, proto: onnx.ModelProto, optimize: bool, threads: int | None, chain: bool,
             base_dir: str = ""):
    import onnxruntime as ort

    custom = _uses_custom_ops(proto)
    if custom:
        from ..graph import schemas as ops
    runs = proto  # what onnxruntime runs; `proto` is what the guard checks feeds against
    if custom:
        from ..graph.constants import Constants

        constants = Constants(proto.graph, base_dir)
        ops.check_custom_nodes(proto.graph, constants.get)
        linked = _chained(proto, base_dir) if chain else None
        if linked is not None:
            runs, source = linked, linked.SerializeToString()
    so = session_options(optimize=optimize, threads=threads, model=runs) if custom else \
        _plain_options(optimize, threads)
    cls = _guarded_session_class() if custom else ort.InferenceSession
    try:
        sess = cls(source, so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise OnnxoptError(f"onnxruntime cannot load the model: {str(exc).splitlines()[0]}") from None
    if custom:
        sess.guard(proto, constants)
    return sess


@functools.cache
def _guarded_session_class():
    import onnxruntime as ort

    from . import pyop
    from .guard import CustomOpShapes, check_feed, expected, graph_inputs

    class GuardedSession(ort.InferenceSession):
        """An InferenceSession whose `run` checks feeds (guard.py) before a custom op can see them."""

        def guard(self, model: onnx.ModelProto, constants) -> None:
            self._inputs = {name: expected(vi) for name, vi in graph_inputs(model).items()}  # read per run
            self._shapes = CustomOpShapes(model, constants)

        def run(self, output_names, input_feed, run_options=None):
            import numpy as np

            for name, value in input_feed.items():
                if name not in self._inputs:
                    raise OnnxoptError(f"unknown input '{name}'; the model's inputs are {', '.join(self._inputs)}")
                check_feed(name, np.asarray(value), self._inputs[name])
            self._shapes.check(input_feed)
            failed_before = pyop.failures["count"]
            outputs = super().run(output_names, input_feed, run_options)
            if pyop.failures["count"] > failed_before:
                raise OnnxoptError(f"the kernel failed: {pyop.failures['last']}")
            return outputs

    return GuardedSession


def run(model, feeds: dict[str, np.ndarray], *, optimize: bool = True) -> dict[str, np.ndarray]:
    sess = session(model, optimize=optimize)
    names = [o.name for o in sess.get_outputs()]
    try:
        return dict(zip(names, sess.run(names, feeds)))
    except OnnxoptError:
        raise
    except Exception as exc:
        raise OnnxoptError(f"onnxruntime failed to run the model: {str(exc).splitlines()[0]}") from None
