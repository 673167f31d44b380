"""Fine-tuning workflow: training hooks and commands, calibration, compare gates."""
import sys

import numpy as np
import onnx
import pytest
from conftest import ROOT, accuracy, cli, load_split
from onnx import numpy_helper

import onnxopt
from onnxopt.recover.hooks import reconstruct

HOOKS = "hookmods.trainhooks"
TRAINER = ROOT / "tests" / "hookmods" / "trainhooks.py"


@pytest.fixture
def run_in_tests():
    return ROOT / "tests"


def packed(model, name="/conv3/Conv/bit_weights"):
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


@pytest.mark.slow
def test_hook_changes_reach_the_lowered_model(tmp_path, run_in_tests):
    cnn = ROOT / "models" / "cnn.onnx"
    plain = cli("binarize", cnn, "--skip", "first_conv", "-o", tmp_path / "plain.onnx", cwd=run_in_tests)
    hooked = cli("binarize", cnn, "--skip", "first_conv", "--train-hook", f"{HOOKS}:flip_conv3",
                 "-o", tmp_path / "hooked.onnx", cwd=run_in_tests)
    assert plain.returncode == 0 and hooked.returncode == 0, hooked.stderr
    a, b = packed(onnx.load(tmp_path / "plain.onnx")), packed(onnx.load(tmp_path / "hooked.onnx"))
    # 64 channels fill each word: negating every weight flips every bit
    assert np.array_equal(b, ~a)


def test_train_cmd_round_trip(tmp_path, run_in_tests):
    cmd = f"{sys.executable} {TRAINER} flip {{input}} {{output}}"
    r = cli("binarize", ROOT / "models" / "cnn.onnx", "--skip", "first_conv", "--train-cmd", cmd,
            "-o", tmp_path / "cmd.onnx", cwd=run_in_tests)
    assert r.returncode == 0, r.stderr
    lowered = onnx.load(tmp_path / "cmd.onnx")
    direct = onnxopt.binarize_convolution(flip_in_memory(), skip=["first_conv"])
    assert np.array_equal(packed(lowered), packed(direct))


def flip_in_memory():
    sys.path.insert(0, str(ROOT / "tests"))
    from hookmods.trainhooks import flip_conv3

    model = onnxopt.load_model(ROOT / "models" / "cnn.onnx")
    return flip_conv3(model)


@pytest.mark.parametrize("args,text", [
    (["--train-hook", f"{HOOKS}:add_node"], "training hook changed the graph (nodes differ)"),
    (["--train-hook", f"{HOOKS}:boom"], "training hook failed: RuntimeError: diverged"),
    (["--train-hook", f"{HOOKS}:needs_arg", "--hook-arg", "scale=3"], "scale='3'"),
    (["--train-cmd", f"{sys.executable} {TRAINER} fail {{input}} {{output}}"], "exited with 3: CUDA out of memory"),
    (["--train-cmd", f"{sys.executable} {TRAINER} nothing {{input}} {{output}}"], "wrote no {output} file"),
    (["--train-cmd", "python train.py"], "must contain {input} and {output}"),
])
def test_bad_training_is_refused_cleanly(tmp_path, run_in_tests, args, text):
    out = tmp_path / "out.onnx"
    r = cli("binarize", ROOT / "models" / "cnn.onnx", "--skip", "first_conv", *args, "-o", out, cwd=run_in_tests)
    assert r.returncode in (1, 2) and text in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_hook_arg_reaches_hook(tmp_path, run_in_tests):
    r = cli("binarize", ROOT / "models" / "cnn.onnx", "--train-hook", f"{HOOKS}:needs_arg", "--hook-arg", "scale=2",
            "-o", tmp_path / "ok.onnx", cwd=run_in_tests)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("arrays,text", [
    ({"wrong_name": np.zeros((4, 784), np.float32), "other": np.zeros(3)}, "no array for input(s) input"),
    ({"input": np.zeros((4, 28, 28), np.float32)}, "has shape [4, 28, 28], the model expects [?, 784]"),
    ({"input": np.zeros((4, 784), np.float64)}, "has dtype float64"),
])
def test_bad_calibration_files_are_refused(tmp_path, arrays, text):
    path = tmp_path / "calib.npz"
    np.savez(path, **arrays)
    r = cli("factor", ROOT / "models" / "mlp.onnx", "--rank", "0.1", "--calibration", path, "-o", tmp_path / "o.onnx")
    assert r.returncode == 1 and text in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_data_aware_factors_lose_less_accuracy(capsys):
    model = onnxopt.load_model(ROOT / "models" / "mlp.onnx")
    x, y = load_split("mlp", "test")
    calib, _ = load_split("mlp", "calib")
    plain, report = onnxopt.factor_with_report(model, rank="0.03", skip=["out"])
    aware, _ = onnxopt.factor_with_report(model, rank="0.03", skip=["out"], calibration={"input": calib})
    dense = sum(x.params_before for x in report.layers if x.op_type == "Gemm")
    after = dense - sum(x.params_before - x.params_after for x in report.changed)
    acc = [accuracy(m, x, y) for m in (model, plain, aware)]
    with capsys.disabled():
        print(f"\nmlp at {after / dense:.0%} of dense params: float {acc[0]:.4f}, plain SVD {acc[1]:.4f}, "
              f"calibrated {acc[2]:.4f}")
    assert after <= 0.5 * dense
    assert acc[2] > acc[1]


@pytest.mark.slow
def test_binary_refit_recovers_accuracy(capsys):
    model = onnxopt.load_model(ROOT / "models" / "cnn.onnx")
    x, y = load_split("cnn", "test")
    calib, _ = load_split("cnn", "calib")
    plain = onnxopt.binarize_convolution(model, skip=["first_conv"])
    refit = onnxopt.binarize_convolution(model, skip=["first_conv"], calibration={"input": calib})
    hooked = onnxopt.binarize_convolution(
        model, skip=["first_conv"],
        train_function=lambda m: reconstruct(m, calibration=str(ROOT / "models" / "cnn_calib.npz")))
    acc = [accuracy(m, x, y) for m in (model, plain, refit, hooked)]
    with capsys.disabled():
        print(f"\ncnn binarized but first conv: float {acc[0]:.4f}, no recovery {acc[1]:.4f}, calibration refit "
              f"{acc[2]:.4f}, reconstruct hook {acc[3]:.4f}")
    assert acc[2] > acc[1] and acc[3] == acc[2]


@pytest.mark.slow
def test_compare_gates(tmp_path):
    cnn, data = ROOT / "models" / "cnn.onnx", ROOT / "models" / "cnn_test.npz"
    assert cli("binarize", cnn, "--skip", "first_conv", "-o", tmp_path / "b.onnx").returncode == 0
    same = cli("compare", cnn, cnn, "--data", data, "--max-drop", "0", "--min-accuracy", "0.9")
    assert same.returncode == 0 and "top-1 agreement 1.0000" in same.stdout
    gate = cli("compare", cnn, tmp_path / "b.onnx", "--data", data, "--max-drop", "0.05")
    assert gate.returncode == 1 and "more than --max-drop 0.05" in gate.stderr
    js = cli("compare", cnn, tmp_path / "b.onnx", "--data", data, "--json")
    import json

    result = json.loads(js.stdout)
    assert result["A"]["accuracy"] > result["B"]["accuracy"] and result["samples"] == 1000


@pytest.mark.slow
def test_emulated_form_runs_in_plain_onnxruntime_and_lowers_back(tmp_path):
    import onnxruntime as ort

    cnn = ROOT / "models" / "cnn.onnx"
    r = cli("binarize", cnn, "--skip", "first_conv", "--emulate", "-o", tmp_path / "emu.onnx")
    assert r.returncode == 0, r.stderr
    emu = onnx.load(tmp_path / "emu.onnx")
    assert {n.domain for n in emu.graph.node} == {""}  # standard ops only
    x, _ = load_split("cnn", "test")
    plain = ort.InferenceSession(str(tmp_path / "emu.onnx"), providers=["CPUExecutionProvider"])
    (emulated,) = plain.run(None, {"input": x[:64]})
    transformed = onnxopt.convert_to_binary_convolution(onnxopt.load_model(cnn), skip=["first_conv"])
    (want,) = onnxopt.session(transformed).run(None, {"input": x[:64]})
    np.testing.assert_allclose(emulated, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    r = cli("lower", tmp_path / "emu.onnx", "-o", tmp_path / "low.onnx", "--json")
    assert r.returncode == 0, r.stderr
    lowered = onnx.load(tmp_path / "low.onnx")
    assert [n.op_type for n in lowered.graph.node].count("BitConv") == 2
    assert not any(n.op_type in ("Where", "Greater") for n in lowered.graph.node)
    (bits,) = onnxopt.session(lowered).run(None, {"input": x[:64]})
    assert np.array_equal(bits, want)
