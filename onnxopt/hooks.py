"""User functions named on the command line as `package.module:function`."""
from __future__ import annotations

import importlib
import os
import sys
from typing import Callable

from .errors import UsageError


def load_function(spec: str, what: str = "hook") -> Callable:
    """Import `module:function` (the current directory is searched too, as `python -m` would)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"invalid {what} '{spec}': expected module:function, e.g. mypkg.rank:choose")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise UsageError(f"{what} '{spec}': cannot import {module_name} ({type(exc).__name__}: {exc})") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise UsageError(f"{what} '{spec}': {module_name} has no attribute '{attr}'")
    if not callable(fn):
        raise UsageError(f"{what} '{spec}': {attr} is not callable")
    return fn


def run_training(train_function: Callable, model, **kwargs):
    """Call a training hook and check it kept the graph: same nodes, same initializer names and shapes."""
    import onnx

    from .errors import OnnxoptError

    before = onnx.ModelProto()
    before.CopyFrom(model)
    try:
        trained = train_function(model, **kwargs)
    except Exception as exc:
        raise OnnxoptError(f"training hook failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(trained, onnx.ModelProto):
        raise OnnxoptError(f"training hook returned {type(trained).__name__}, expected onnx.ModelProto")
    problem = graph_change(before, trained)
    if problem:
        raise OnnxoptError(f"training hook changed the graph ({problem}); only weight values may change")
    return trained


def graph_change(before, after) -> str | None:
    """Why `after` is not `before` with new weight values, or None."""
    def nodes(m):
        return [(n.op_type, n.domain, tuple(n.input), tuple(n.output)) for n in m.graph.node]

    if nodes(before) != nodes(after):
        return "nodes differ"
    shapes_before = {t.name: (tuple(t.dims), t.data_type) for t in before.graph.initializer}
    shapes_after = {t.name: (tuple(t.dims), t.data_type) for t in after.graph.initializer}
    if shapes_before.keys() != shapes_after.keys():
        missing = sorted(shapes_before.keys() - shapes_after.keys())
        extra = sorted(shapes_after.keys() - shapes_before.keys())
        return f"initializers missing: {missing[:3]}, added: {extra[:3]}"
    changed = [k for k in shapes_before if shapes_before[k] != shapes_after[k]]
    if changed:
        return f"initializer '{changed[0]}' changed shape or dtype"
    return None


def command_trainer(template: str, timeout: float | None = None) -> Callable:
    """A training function that runs an external command, e.g. "python train.py {input} {output}".

    The transformed model is written to a temporary folder as {input}; the command must write {output}.
    """
    import shlex
    import subprocess
    import tempfile
    from pathlib import Path

    import onnx

    from .errors import OnnxoptError

    if "{input}" not in template or "{output}" not in template:
        raise UsageError(f"invalid --train-cmd '{template}': it must contain {{input}} and {{output}}")
    try:
        words = shlex.split(template)
    except ValueError as exc:
        raise UsageError(f"invalid --train-cmd '{template}': {exc}") from None

    def train(model):
        with tempfile.TemporaryDirectory(prefix="onnxopt-train-") as tmp:
            src, dst = Path(tmp) / "input.onnx", Path(tmp) / "output.onnx"
            onnx.save_model(model, str(src))
            argv = [w.replace("{input}", str(src)).replace("{output}", str(dst)) for w in words]
            try:
                done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
            except FileNotFoundError:
                raise OnnxoptError(f"--train-cmd: command not found: {argv[0]}") from None
            except subprocess.TimeoutExpired:
                raise OnnxoptError(f"--train-cmd: timed out after {timeout} s") from None
            if done.returncode != 0:
                tail = " | ".join(done.stderr.strip().splitlines()[-3:]) or "no stderr"
                raise OnnxoptError(f"--train-cmd exited with {done.returncode}: {tail}")
            if not dst.is_file():
                raise OnnxoptError("--train-cmd finished but wrote no {output} file")
            try:
                return onnx.load(str(dst))
            except Exception as exc:
                raise OnnxoptError(f"--train-cmd wrote an unreadable {{output}} ({exc})") from None

    return train


def reconstruct(model, calibration: str | None = None, **_):
    """Ready-made training hook: refit α/bias of binarized layers on calibration data, no training loop.

        onnxopt binarize models/cnn.onnx --skip first_conv --train-hook onnxopt.hooks:reconstruct \\
            --hook-arg calibration=models/cnn_calib.npz
    """
    from .calibrate import load_calibration, refit_binary
    from .errors import OnnxoptError

    if not calibration:
        raise OnnxoptError("onnxopt.hooks:reconstruct needs --hook-arg calibration=FILE.npz")
    return refit_binary(model, load_calibration(calibration, model))
