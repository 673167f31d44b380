import contextlib
import hashlib
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"


def parse_model(text: str, ir_version: int = 8) -> onnx.ModelProto:
    """A model from onnx.parser text; initializers given as `<...>` lines in the graph."""
    model = onnx.parser.parse_model(text)
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    return model


def conv_model(w, bias=None, name="conv", input_shape=None, **attrs) -> onnx.ModelProto:
    """One Conv of weight `w` (and `bias`), input X of symbolic N, H, W unless `input_shape` is given."""
    from onnx import helper, numpy_helper

    inputs = ["X", "W"] + (["B"] if bias is not None else [])
    inits = [numpy_helper.from_array(w, "W")] + ([numpy_helper.from_array(bias, "B")] if bias is not None else [])
    node = helper.make_node("Conv", inputs, ["Y"], name=name, **attrs)
    shape = input_shape or ["N", w.shape[1] * attrs.get("group", 1)] + ["H", "W"][: w.ndim - 2]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def ort_run(model, feeds):
    import onnxopt

    sess = onnxopt.session(model, optimize=False)
    return sess.run(None, feeds)


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cli(*args, cwd=None, env=None):
    """Run the installed CLI in a subprocess, as a user or CI would."""
    return subprocess.run([sys.executable, "-m", "onnxopt", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300, env=env)


def run_cli(*args) -> tuple[int, str, str]:
    """The CLI's main() in this process (a subprocess per case would take minutes): exit code, stdout, stderr."""
    from onnxopt.cli import main as cli_main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli_main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def assert_clean_refusal(code: int, err: str):
    assert code in (1, 2), err
    lines = [line for line in err.splitlines() if line.startswith("onnxopt: error:")]
    assert len(lines) == 1, err
    assert "internal error" not in err and "Traceback" not in err, err


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def mlp_path():
    return MODELS / "mlp.onnx"


@pytest.fixture(scope="session")
def cnn_path():
    return MODELS / "cnn.onnx"


def load_split(name: str, split: str):
    with np.load(MODELS / f"{name}_{split}.npz") as d:
        return d["input"], d["label"]


def accuracy(model, x, y) -> float:
    (logits,) = ort_run(model, {"input": x})
    return float((logits.argmax(1) == y).mean())
