"""quantize (int8 through onnxruntime), the gates every command has, and recipes (`onnxopt apply`)."""
import json
import shutil

import numpy as np
import onnx
import pytest
from conftest import MODELS, ROOT, accuracy, load_split, run_cli, sha256

import onnxopt
from onnxopt.errors import UsageError

EXAMPLES = ROOT / "examples"


def _weights_int8(model: onnx.ModelProto) -> set[str]:
    """Independent of the report: nodes whose weight comes out of a DequantizeLinear of an int8 initializer, or
    integer ops."""
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    names = set()
    for node in model.graph.node:
        src = producers.get(node.input[1]) if len(node.input) > 1 else None
        if src is not None and src.op_type == "DequantizeLinear" and src.input[0] in inits:
            if inits[src.input[0]].data_type == onnx.TensorProto.INT8:
                names.add(node.name)
        if node.op_type in ("MatMulInteger", "ConvInteger"):
            names.add(node.op_type)
    return names


def test_static_int8_mlp_keeps_accuracy_and_format(tmp_path):
    source = onnx.load(str(MODELS / "mlp.onnx"))
    out = tmp_path / "q.onnx"
    model, report = onnxopt.quantize(MODELS / "mlp.onnx", calibration=MODELS / "mlp_calib.npz", output=out)
    onnx.checker.check_model(onnx.load(str(out)))
    assert model.ir_version == source.ir_version
    assert [(o.domain, o.version) for o in model.opset_import] == [(o.domain, o.version) for o in source.opset_import]
    assert _weights_int8(model) == {"/l1/Gemm", "/l2/Gemm", "/out/Gemm"} == {x.name for x in report.changed}
    assert report.size["after"] < 0.3 * report.size["before"]
    x, y = load_split("mlp", "test")
    float_acc, int8_acc = accuracy(source, x, y), accuracy(str(out), x, y)
    print(f"\nmlp int8: accuracy {float_acc:.4f} -> {int8_acc:.4f}, {report.size}")
    assert int8_acc >= float_acc - 0.01


def test_dynamic_int8_says_what_it_cannot_take():
    model, report = onnxopt.quantize(MODELS / "cnn.onnx")
    rows = {x.name: x for x in report.layers}
    assert "dynamic quantization has no integer Gemm" in rows["/fc/Gemm"].reason
    assert "ConvInteger" in _weights_int8(model)
    assert {x.name for x in report.changed} == {"/first_conv/Conv", "/conv2/Conv", "/conv3/Conv"}


def test_int8_never_touches_the_custom_ops(tmp_path):
    lowered, _ = onnxopt.binarize(MODELS / "cnn.onnx", skip=["first_conv"])
    model, report = onnxopt.quantize(lowered, calibration=MODELS / "cnn_calib.npz")
    custom = [n for n in model.graph.node if n.domain == "com.onnxopt"]
    assert len(custom) == 2 and {x.name for x in report.changed} == {"/first_conv/Conv", "/fc/Gemm"}
    before = {n.name: list(n.input) for n in lowered.graph.node if n.domain == "com.onnxopt"}
    inits = {t.name for t in model.graph.initializer}
    for node in custom:  # its packed weights, alpha and bias still plain initializers
        assert all(name in inits for name in node.input[1:])
        assert node.name in before
    x, y = load_split("cnn", "test")
    assert accuracy(model, x[:200], y[:200]) > 0.5


@pytest.mark.slow
def test_max_drop_keeps_the_costliest_layers_float(tmp_path):
    data = tmp_path / "inputs.npz"  # no labels: top-1 agreement with the float model
    np.savez(data, input=load_split("cnn", "test")[0])
    vit, calib = MODELS / "tiny_vit.onnx", MODELS / "cnn_calib.npz"
    _, everything = onnxopt.quantize(vit, calibration=calib, data=data)
    assert everything.check["score"]["drop"] > 0.003  # int8 everywhere costs more than the gate allows
    _, report = onnxopt.quantize(vit, calibration=calib, data=data, max_drop=0.003)
    kept = [x for x in report.layers if x.reason.startswith("kept float for --max-drop")]
    print(f"\ntiny_vit int8: agreement {everything.check['score']['candidate']:.4f} everywhere, "
          f"{report.check['score']['candidate']:.4f} with {[x.name for x in kept]} float")
    assert kept and report.check["score"]["drop"] <= 0.003
    assert len(report.changed) >= 6  # most layers still int8


@pytest.mark.parametrize("argv,message", [
    (["--min-speedup", "100"], "is below --min-speedup 100"),
    (["--max-size", "0.01"], "exceeds --max-size 0.01"),
    (["--max-size", "1KB"], "exceeds --max-size 1KB (1,000 bytes)"),
])
def test_failed_gates_exit_1_with_the_figure_and_write_nothing(tmp_path, argv, message):
    out = tmp_path / "m.onnx"
    code, stdout, err = run_cli("factor", MODELS / "mlp.onnx", "--rank", "0.5", *argv, "-o", out)
    assert code == 1 and not out.exists()
    (line,) = [x for x in err.splitlines() if x.startswith("onnxopt: error:")]
    assert message in line and "nothing was written" in line
    assert "model file:" in stdout


@pytest.mark.parametrize("kwargs", [{"min_speedup": 0.0}, {"max_size": "big"}, {"max_size": "-3"},
                                    {"max_drop": 0.1}, {"labels": "y"}])
def test_bad_gate_options_are_usage_errors(kwargs):
    with pytest.raises(UsageError):
        onnxopt.quantize(MODELS / "mlp.onnx", **kwargs)


def test_speedup_gate_passes_when_met():
    _, report = onnxopt.factor(MODELS / "mlp.onnx", rank="0.1", min_speedup=0.01)
    assert report.latency["speedup"] > 0.01 and report.latency["samples"] == 8


# ---- recipes ----------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("recipe,model", [("budget_int8", "mlp"), ("int8", "cnn"), ("int8", "mlp"),
                                          ("pruned_int8", "cnn"), ("binary", "cnn")])
def test_example_recipes_run_and_pass_their_gates(tmp_path, recipe, model):
    """The example recipes name no data: one recipe serves the CNN and the MLP, given their data."""
    out = tmp_path / "out.onnx"
    code, stdout, err = run_cli("apply", EXAMPLES / f"{recipe}.toml", MODELS / f"{model}.onnx", "-o", out, "--json",
                                "--calibration", MODELS / f"{model}_calib.npz", "--data", MODELS / f"{model}_test.npz")
    assert code == 0, err
    report = json.loads(stdout)
    onnx.checker.check_model(onnx.load(str(out)))
    print(f"\n{recipe}:")
    for row in report["recipe"]["steps"]:
        assert row["size"] > 0 and row["score"] is not None and row["latency"]["speedup"] > 0
        print(f"  {row['run']}: {row['layers_changed']} changed, {row['size']:,} B, "
              f"{row['score']['metric']} {row['score']['candidate']:.4f}, {row['latency']['speedup']:.2f}x")
    assert report["size"]["after"] < report["size"]["before"]


def _recipe(tmp_path, text: str):
    path = tmp_path / "r.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,message", [
    ('[[step]]\nrun = "factor"\nrnak = 0.5\n', "step 1 (factor): unknown key 'rnak'"),
    ('[[step]]\nrun = "factor"\nrank = true\n', "step 1 (factor): 'rank' must be a string or a number"),
    ('[[step]]\nrun = "factor"\nrank = 0.5\nskip = "out"\n', "'skip' must be a list of strings"),
    ('[[step]]\nrun = "sweep"\n', "step 1: 'run' must name a command"),
    ('[[step]]\nrun = "prune"\n', "step 1 (prune): give --keep F"),
    ('[[step]]\nrun = "prune"\nkeep = 0.5\nepochs = 2\n', "step 1 (prune): --epochs needs --finetune"),
    ('[[step]]\nrun = "factor"\nrank = 0.5\noutput = "x.onnx"\n', "unknown key 'output'"),
    ('[[step]]\nrun = "factor"\nrank = 0.5\n[gate]\nmax_dorp = 0.1\n', "[gate]: unknown key 'max_dorp'"),
    ('[[step]]\nrun = "factor"\nrank = 0.5\n[gate]\nmax_drop = 0.1\n', "[gate]: --max-drop needs --data"),
    ('[[step]]\nrun = "factor"\nrank = 3.5\n', "step 1 (factor): invalid rank"),
    ('[[step]]\nrun = "factor"\nrank = 0.5\n[extra]\n', "unknown key 'extra'"),
    ('gate = 1\n', "no steps"),
    ('[[step]\nrun = "factor"\n', "not valid TOML"),
    ('[[step]]\nrun = "quantize"\ncalibration = "nowhere.npz"\n', "nowhere.npz: no such calibration file"),
])
def test_malformed_recipes_name_the_file_and_key(tmp_path, text, message):
    path = _recipe(tmp_path, text)
    out = tmp_path / "out.onnx"
    code, _, err = run_cli("apply", path, MODELS / "mlp.onnx", "-o", out)
    assert code == 2 and not out.exists(), err
    (line,) = [x for x in err.splitlines() if x.startswith("onnxopt: error:")]
    assert str(path) in line and message in line, line


def test_a_failing_recipe_gate_writes_nothing_and_leaves_the_input(tmp_path):
    shutil.copy(MODELS / "mlp.onnx", tmp_path / "mlp.onnx")
    shutil.copy(MODELS / "mlp_test.npz", tmp_path / "test.npz")
    digest = sha256(tmp_path / "mlp.onnx")
    path = _recipe(tmp_path, '[[step]]\nrun = "factor"\nrank = 1\n[gate]\ndata = "test.npz"\nmax_drop = 0.01\n')
    code, stdout, err = run_cli("apply", path, tmp_path / "mlp.onnx", "-o", tmp_path / "out.onnx")
    assert code == 1 and "more than --max-drop 0.01" in err
    assert not (tmp_path / "out.onnx").exists() and sha256(tmp_path / "mlp.onnx") == digest
    assert "step 1 factor:" in stdout


def test_recipe_paths_are_relative_to_the_recipe_and_auto_budgets_use_the_gate(tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    folder.mkdir()
    shutil.copy(MODELS / "mlp_train.npz", folder / "search.npz")
    path = _recipe(folder, '[[step]]\nrun = "factor"\nbudget = "params=auto"\n'
                           '[gate]\ndata = "search.npz"\nmax_drop = 0.01\n')
    monkeypatch.chdir(tmp_path)  # not the recipe's folder
    model, report = onnxopt.apply(path, MODELS / "mlp.onnx")
    assert report.budget["search"] and report.check["score"]["drop"] <= 0.01
    assert report.recipe["steps"][0]["score"]["drop"] == report.check["score"]["drop"]


def test_command_line_data_fills_and_replaces_the_recipes(tmp_path):
    """`apply --calibration/--data` give every step that takes them and the gate their data, replacing the
    recipe's: without them a generic recipe's max_drop gate is a usage error naming --data."""
    from onnxopt.pipeline import recipe as recipes

    path = _recipe(tmp_path, '[[step]]\nrun = "factor"\nrank = 0.5\ncalibration = "mine.npz"\n[[step]]\n'
                             'run = "quantize"\n[gate]\nmax_drop = 0.2\n')
    with pytest.raises(UsageError, match="--max-drop needs --data"):
        recipes.load(path)
    calib, test = str(MODELS / "mlp_calib.npz"), str(MODELS / "mlp_test.npz")
    loaded = recipes.load(path, given={"calibration": calib, "data": test, "labels": "label"})
    assert [options.get("calibration") for _, options in loaded.steps] == [calib, calib]
    assert loaded.gate["data"] == test and loaded.gate["labels"] == "label"
    out = tmp_path / "out.onnx"
    code, _, err = run_cli("apply", path, MODELS / "mlp.onnx", "-o", out, "--calibration", MODELS / "mlp_calib.npz",
                           "--data", MODELS / "mlp_test.npz")
    assert code == 0, err
    _, report = onnxopt.apply(path, MODELS / "mlp.onnx", calibration=MODELS / "mlp_calib.npz",
                              data=MODELS / "mlp_test.npz")
    assert report.check["score"]["samples"] == 1000  # scored on the given --data
