"""Training hooks: a function in this process, or an external trainer command, between transform and lower.

The contract: a hook gets the transformed model and returns it with the same nodes (attributes included),
the same initializer names, shapes and dtypes, weights inline, and com.onnxopt constants a kernel can
take (finite α and bias, valid geometry). Only weight values change; anything else is refused.
"""
from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Callable

import onnx

from ..errors import OnnxoptError, UsageError
from ..graph.constants import Constants
from ..graph.nodes import copy_model
from ..graph.schemas import check_custom_nodes

KILL_GRACE_S = 5  # after SIGTERM, how long a trainer gets before SIGKILL


class _HookTimeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float | None):
    """Interrupt Python code in this (main) thread after `seconds` (SIGALRM); elsewhere, no limit."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise _HookTimeout()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_training(train_function: Callable, model: onnx.ModelProto, *, timeout: float | None = None, **kwargs):
    """Call a training hook and check that it kept to the contract (module docstring)."""
    before = copy_model(model)
    try:
        with _time_limit(timeout):
            trained = train_function(model, **kwargs)
    except _HookTimeout:
        raise OnnxoptError(f"training hook timed out after {timeout:g} s (--train-timeout)") from None
    except OnnxoptError:
        raise
    except Exception as exc:
        raise OnnxoptError(f"training hook failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(trained, onnx.ModelProto):
        raise OnnxoptError(f"training hook returned {type(trained).__name__}, expected onnx.ModelProto")
    problem = graph_change(before, trained)
    if problem:
        raise OnnxoptError(f"training hook changed the graph ({problem}); only weight values may change")
    try:
        check_custom_nodes(trained.graph, Constants(trained.graph).get)
    except OnnxoptError as exc:
        raise OnnxoptError(f"training hook left invalid values: {exc}") from None
    return trained


def graph_change(before: onnx.ModelProto, after: onnx.ModelProto) -> str | None:
    """Why `after` is not `before` with new weight values, or None."""
    def nodes(m):
        return [(n.op_type, n.domain, tuple(n.input), tuple(n.output)) for n in m.graph.node]

    def attributes(m):
        return [[a.SerializeToString(deterministic=True) for a in n.attribute] for n in m.graph.node]

    if nodes(before) != nodes(after):
        return "nodes differ"
    changed = next((n.name or n.op_type for n, a, b in zip(after.graph.node, attributes(before), attributes(after))
                    if a != b), None)
    if changed is not None:
        return f"attributes of node '{changed}' differ"
    shapes_before = {t.name: (tuple(t.dims), t.data_type) for t in before.graph.initializer}
    shapes_after = {t.name: (tuple(t.dims), t.data_type) for t in after.graph.initializer}
    if shapes_before.keys() != shapes_after.keys():
        missing = sorted(shapes_before.keys() - shapes_after.keys())
        extra = sorted(shapes_after.keys() - shapes_before.keys())
        return f"initializers missing: {missing[:3]}, added: {extra[:3]}"
    changed = next((k for k in shapes_before if shapes_before[k] != shapes_after[k]), None)
    if changed is not None:
        return f"initializer '{changed}' changed shape or dtype"
    external = next((t.name for t in after.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL), None)
    if external is not None:
        return f"initializer '{external}' points at external data"
    return None


def command_trainer(template: str) -> Callable:
    """A training function that runs an external command, e.g. "python train.py {input} {output}".

    The transformed model is written to a temporary folder as {input}; the command must write {output}.
    The command runs in its own process group, so a timeout, Ctrl-C or SIGTERM stops it and every process
    it started; the folder is removed on every exit path.
    """
    try:
        words = shlex.split(template)
    except ValueError as exc:
        raise UsageError(f"invalid --train-cmd '{template}': {exc}") from None

    def train(model, timeout: float | None = None):
        with tempfile.TemporaryDirectory(prefix="onnxopt-train-") as tmp:
            src, dst = Path(tmp) / "input.onnx", Path(tmp) / "output.onnx"
            onnx.save_model(model, str(src))
            argv = [w.replace("{input}", str(src)).replace("{output}", str(dst)) for w in words]
            code, stderr = _run_group(argv, timeout)
            if code != 0:
                tail = " | ".join(stderr.strip().splitlines()[-3:]) or "no stderr"
                raise OnnxoptError(f"--train-cmd exited with {code}: {tail}")
            if not dst.is_file():
                raise OnnxoptError("--train-cmd finished but wrote no {output} file")
            try:
                return onnx.load(str(dst))
            except Exception as exc:
                raise OnnxoptError(f"--train-cmd wrote an unreadable {{output}} ({exc})") from None

    return train


def _run_group(argv: list[str], timeout: float | None) -> tuple[int, str]:
    """Run argv in a new process group; on timeout or interruption kill the whole group."""
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    except FileNotFoundError:
        raise OnnxoptError(f"--train-cmd: command not found: {argv[0]}") from None
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise OnnxoptError(f"--train-cmd timed out after {timeout:g} s (--train-timeout)") from None
    except BaseException:  # Ctrl-C, SIGTERM (raised as KeyboardInterrupt by the CLI), anything
        _kill_group(proc)
        raise
    return proc.returncode, stderr


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.communicate(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


def reconstruct(model, calibration: str | None = None, **_):
    """Ready-made training hook: refit α/bias of binarized layers on calibration data, no training loop.

        onnxopt binarize models/cnn.onnx --skip first_conv --train-hook onnxopt.recover.hooks:reconstruct \\
            --hook-arg calibration=models/cnn_calib.npz
    """
    from .calibrate import load_calibration, refit_binary

    if not calibration:
        raise OnnxoptError("onnxopt.recover.hooks:reconstruct needs --hook-arg calibration=FILE.npz")
    return refit_binary(model, load_calibration(calibration, model))
