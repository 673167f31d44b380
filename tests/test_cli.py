"""The command line as users and CI pipelines run it: outputs, exit codes, one-line errors."""
import json

import numpy as np
import onnx
import pytest
from conftest import MODELS, cli, run_cli, sha256

import onnxopt


@pytest.fixture
def work(tmp_path):
    for name in ("mlp.onnx", "cnn.onnx", "mlp_test.npz", "cnn_test.npz"):
        (tmp_path / name).write_bytes((MODELS / name).read_bytes())
    return tmp_path


@pytest.mark.slow
def test_factor_writes_default_output_and_keeps_input(work):
    before = sha256(work / "mlp.onnx")
    r = cli("factor", work / "mlp.onnx", "--rank", "0.6", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    out = work / "mlp.factored.onnx"
    assert report["output"] == str(out) and out.exists()
    assert report["totals"]["params_after"] < report["totals"]["params_before"]
    assert sha256(work / "mlp.onnx") == before
    src, dst = onnx.load(work / "mlp.onnx"), onnx.load(out)
    onnx.checker.check_model(dst)
    assert dst.ir_version == src.ir_version and list(dst.opset_import) == list(src.opset_import)
    assert not list(work.glob(".*"))  # no temp files left behind
    # no overwrite without --force
    r = cli("factor", work / "mlp.onnx", "--rank", "0.6")
    assert r.returncode == 2 and "exists; pass --force" in r.stderr
    assert cli("factor", work / "mlp.onnx", "--rank", "0.6", "--force", "-q").returncode == 0


@pytest.mark.slow
def test_factor_check_and_gate(work):
    ok = cli("factor", work / "mlp.onnx", "--rank", "1.0", "--allow-growth", "--data", work / "mlp_test.npz",
             "--max-error", "1e-4", "-o", work / "full.onnx")
    assert ok.returncode == 0, ok.stderr
    assert "max rel diff" in ok.stdout
    bad = cli("factor", work / "mlp.onnx", "--rank", "2", "--check", "4", "--max-error", "0.01", "-o", work / "x.onnx")
    assert bad.returncode == 1 and "exceeds --max-error" in bad.stderr
    assert not (work / "x.onnx").exists()


def test_rank_for_and_energy(work):
    r = cli("factor", work / "mlp.onnx", "--energy", "0.9", "--rank-for", "out=2", "--json", "-o", work / "e.onnx")
    assert r.returncode == 0, r.stderr
    ranks = {x["name"]: x["rank"] for x in json.loads(r.stdout)["layers"]}
    assert ranks["/out/Gemm"] == 2 and 1 <= ranks["/l1/Gemm"] < 400


def _one_error_line(r, code, text):
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr and text in lines[0]


@pytest.mark.parametrize("args,code,text", [
    (["factor", "missing.onnx", "--rank", "0.5"], 2, "no such file"),
    (["factor", ".", "--rank", "0.5"], 2, "is a directory"),
    (["factor", "junk.onnx", "--rank", "0.5"], 1, "not a readable ONNX model"),
    (["factor", "truncated.onnx", "--rank", "0.5"], 1, "not a readable ONNX model"),
    (["factor", "mlp.onnx", "--rank", "0"], 2, "invalid rank"),
    (["factor", "mlp.onnx", "--rank", "-1"], 2, "invalid rank"),
    (["factor", "mlp.onnx", "--rank", "1.5"], 2, "invalid rank"),
    (["factor", "mlp.onnx", "--rank", "abc"], 2, "invalid rank"),
    (["factor", "mlp.onnx"], 2, "give a rank"),
    (["factor", "mlp.onnx", "--rank", "4", "--rank-for", "nothing_here=2"], 2, "matches no Gemm/MatMul/Conv layer"),
    (["factor", "mlp.onnx", "--projection-fn", "no_such_module:f"], 2, "cannot import"),
    (["factor", "mlp.onnx", "--projection-fn", "notaspec"], 2, "expected module:function"),
    (["factor", "mlp.onnx", "--bogus"], 2, "No such option"),
    (["binarize", "cnn.onnx", "--scale", "weird"], 2, "invalid scale 'weird': choose one of channel, tensor, none"),
    (["factor", "mlp.onnx", "--rank", "4", "--skip", "nothing_here"], 2, "--skip pattern 'nothing_here' matches no"),
    (["factor", "mlp.onnx", "--rank", "4", "--energy", "0.9"], 2, "--rank and --energy exclude each other"),
    (["run", "cnn.onnx", "--data", "mlp_test.npz"], 1, "has shape"),
])
def test_bad_input_gives_one_line_and_exit_code(work, args, code, text):
    (work / "junk.onnx").write_bytes(b"\x00\xffnot a model at all" * 10)
    (work / "truncated.onnx").write_bytes((work / "mlp.onnx").read_bytes()[:5000])
    before = {p.name: sha256(p) for p in work.iterdir() if p.is_file()}
    r = cli(*args, cwd=work)
    _one_error_line(r, code, text)
    after = {p.name: sha256(p) for p in work.iterdir() if p.is_file()}
    assert after == before  # nothing written, nothing modified


def test_nothing_changed_warns_and_strict_refuses(work):
    # a rank so high that no layer gains: every layer is left alone with that reason
    r = cli("factor", work / "mlp.onnx", "--rank", "1.0", "-o", work / "n.onnx")
    assert r.returncode == 0 and "no layer was changed" in r.stderr
    r = cli("factor", work / "mlp.onnx", "--rank", "1.0", "--strict", "-o", work / "s.onnx")
    assert r.returncode == 1 and not (work / "s.onnx").exists()


@pytest.mark.slow
def test_binarize_lower_run(work):
    r = cli("binarize", work / "cnn.onnx", "--skip", "first_conv", "--stage", "transform", "-o", work / "t.onnx")
    assert r.returncode == 0, r.stderr
    ops = [n.op_type for n in onnx.load(work / "t.onnx").graph.node]
    assert ops.count("BinaryConv") == 2 and "BitConv" not in ops
    r = cli("lower", work / "t.onnx", "-o", work / "l.onnx", "--data", work / "cnn_test.npz", "--max-error", "0")
    assert r.returncode == 0, r.stderr
    assert [n.op_type for n in onnx.load(work / "l.onnx").graph.node].count("BitConv") == 2
    r = cli("run", work / "l.onnx", "--data", work / "cnn_test.npz", "-o", work / "out.npz")
    assert r.returncode == 0, r.stderr
    with np.load(work / "out.npz") as d:
        assert d["logits"].shape == (1000, 10)


def test_binarize_warns_when_reading_graph_input(work):
    r = cli("binarize", work / "cnn.onnx", "-o", work / "all.onnx")
    assert r.returncode == 0 and "reads graph input 'input' directly" in r.stderr


def test_inspect(work):
    r = cli("inspect", work / "cnn.onnx", "--json")
    result = json.loads(r.stdout)
    rows = {x["name"]: x for x in result["layers"]}
    assert rows["/conv2/Conv"]["binarize"] == "yes" and rows["/fc/Gemm"]["factor"] == "yes"
    assert rows["/conv2/Conv"]["params"] == 64 * 64 * 9
    assert rows["/conv2/Conv"]["flops"] == 2 * 64 * 64 * 9 * 14 * 14
    assert result["totals"]["params"] == sum(r["params"] for r in rows.values()) + 64 + 64 + 128 + 10  # + biases
    assert result["totals"]["flops_unknown_layers"] == 0 and not result["notes"]


def test_inspect_lowered_int8_and_symbolic_sizes(work):
    lowered, _ = onnxopt.binarize(work / "cnn.onnx", skip=["first_conv"])
    quantized, _ = onnxopt.quantize(lowered, calibration=MODELS / "cnn_calib.npz")
    rows = {r["name"]: r for r in onnxopt.inspect(quantized)["layers"]}
    assert rows["/conv2/Conv"]["op_type"] == "BitConv" and "lowered" in rows["/conv2/Conv"]["stored"]
    assert rows["/fc/Gemm"]["stored"] == "int8" and rows["/fc/Gemm"]["params"] == 62720
    tokens = onnxopt.inspect(MODELS / "token_mlp.onnx")
    assert tokens["totals"]["flops_unknown_layers"] == 0  # data propagation found the 16 tokens
    from onnx import TensorProto, helper, numpy_helper
    w = numpy_helper.from_array(np.ones((4, 2, 3, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="c")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, "h", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    symbolic = onnxopt.inspect(model)
    assert symbolic["layers"][0]["flops"] is None and "give --input-shape" in symbolic["notes"][0]
    sized = onnxopt.inspect(model, input_shape=["x:1,2,10,10"])
    assert sized["layers"][0]["flops"] == 2 * 72 * 8 * 8 and not sized["notes"]


@pytest.mark.slow
def test_external_data_in_and_out(work):
    r = cli("factor", work / "mlp.onnx", "--rank", "0.5", "--external-data", "-o", work / "ext.onnx")
    assert r.returncode == 0, r.stderr
    data = list(work.glob("ext.onnx.*.data"))  # the weights live beside the model, under a name unique to the write
    assert len(data) == 1 and data[0].stat().st_size > 100_000
    assert (work / "ext.onnx").stat().st_size < 20_000
    # a model with external data loads as input too, and the result matches the in-file path
    r = cli("factor", work / "ext.onnx", "--rank", "1.0", "--allow-growth", "--data", work / "mlp_test.npz",
            "--max-error", "1e-4", "-o", work / "again.onnx")
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_first_kernel_compile_is_announced_once(tmp_path):
    """On the PyOp bridge, a cold numba cache: one line on stderr before the ~7 s compile; a warm one: silence.
    On the native library nothing compiles, so nothing is announced."""
    import os
    import subprocess
    import sys

    lowered = tmp_path / "low.onnx"
    onnxopt.binarize(MODELS / "cnn.onnx", skip=["first_conv"], output=lowered)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    native = subprocess.run([sys.executable, "-m", "onnxopt", "run", str(lowered), "--data",
                             str(MODELS / "cnn_calib.npz")], capture_output=True, text=True, env=env, timeout=300)
    assert native.returncode == 0 and "compiling" not in native.stderr, native.stderr
    env["ONNXOPT_KERNEL_PATH"] = "pyop"
    runs = [subprocess.run([sys.executable, "-m", "onnxopt", "run", str(lowered), "--data",
                            str(MODELS / "cnn_calib.npz")], capture_output=True, text=True, env=env, timeout=300)
            for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    assert runs[0].stderr.count("compiling the bit-packed convolution kernel") == 1
    assert "compiling" not in runs[1].stderr


def test_report_warns_on_large_errors_and_gives_whole_model_totals(tmp_path):
    code, out, err = run_cli("factor", MODELS / "mlp.onnx", "--rank", "1", "-o", tmp_path / "a.onnx")
    assert code == 0 and err.count("rel.err 0.9") == 3  # rank 1 keeps little of any layer: each one warned
    assert " 1/400 " in out  # rank shown against min(m, n)
    assert "; weights 396,210 -> 2,604 (0.7%)" in out and "float FLOPs/sample 791,200 -> 3,988" in out
    code, out, err = run_cli("factor", MODELS / "mlp.onnx", "--rank", "0.5", "-o", tmp_path / "b.onnx")
    assert code == 0 and "rel.err" not in err
    report = onnxopt.factor(MODELS / "mlp.onnx", rank="0.5")[1].to_dict()
    assert report["size"]["weights_before"] == 396_210 and report["layers"][0]["full_rank"] == 400


def test_check_inputs_are_validated_before_the_rewrite():
    """`factor --check 4` on a model with a symbolic non-batch dim failed after minutes of SVDs (MiniLM: 2m26s);
    now before the first layer is touched."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((8, 8), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "tokens", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "tokens", 8])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    started = []
    with pytest.raises(onnxopt.OnnxoptError, match="unknown dim 1 .'tokens'.: pass --data or --input-shape"):
        onnxopt.factor(model, rank="0.5", check=4, progress=lambda items, label: started.append(label) or items)
    assert not started
    onnxopt.factor(model, rank="0.5", check=4, input_shape=["x:4,3,8"], allow_growth=True)
