"""Hostile input and faults: bad files, unwritable or full output locations, SIGINT, fuzzed models, and
concurrent or wrong feeds on a lowered session. Every case ends in a valid output or one clear error line,
with the input untouched and nothing half-written left behind."""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import assert_clean_refusal, run_cli, sha256
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper
from zoo import KINDS, feeds_for

import onnxopt
from onnxopt.errors import OnnxoptError

REWRITES = ("factor", "binarize", "lower")


def command_args(command: str, model: Path, out: Path, feeds: Path) -> list:
    if command == "run":
        return ["run", model, "--data", feeds, "-o", out]
    if command == "inspect":
        return ["inspect", model]
    return [command, model, "-o", out, "-q"] + (["--rank", "0.5"] if command == "factor" else [])


def hostile_files(tmp: Path) -> dict[str, Path]:
    good = KINDS["weights as initializers"]().SerializeToString()
    broken = KINDS["weights as initializers"]()
    broken.graph.node[0].input[0] = "no_such_tensor"  # onnx.checker fails
    files = {
        "empty file": b"",
        "truncated model": good[: len(good) // 2],
        "random bytes": np.random.default_rng(0).bytes(4096),
        "text file": b'{"not": "an onnx model"}\n',
        "numpy file": b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }",
        "checker fails": broken.SerializeToString(),
    }
    paths = {}
    for name, data in files.items():
        path = tmp / (name.replace(" ", "_") + ".onnx")
        path.write_bytes(data)
        paths[name] = path
    return paths


@pytest.mark.parametrize("command", REWRITES + ("run", "inspect"))
def test_hostile_files_are_refused_cleanly(command, tmp_path):
    feeds = tmp_path / "feeds.npz"
    np.savez(feeds, x=np.zeros((2, 4, 8, 8), np.float32))
    for name, path in hostile_files(tmp_path).items():
        digest = sha256(path)
        out = tmp_path / f"{path.stem}.out"
        code, _, err = run_cli(*command_args(command, path, out, feeds))
        assert_clean_refusal(code, err)
        assert sha256(path) == digest and not out.exists(), name
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(KINDS["weights as initializers"](), str(path))
    return path


def test_unwritable_output_location(model_file, tmp_path):
    if os.geteuid() == 0:  # root writes through permission bits: use a place no one can create files in
        target = Path("/proc/onnxopt-out.onnx")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "out.onnx"
    for command in REWRITES:
        code, _, err = run_cli(*command_args(command, model_file, target, None))
        assert_clean_refusal(code, err)
        assert "cannot write here" in err
    code, _, err = run_cli(*command_args("factor", model_file, tmp_path / "missing" / "out.onnx", None))
    assert_clean_refusal(code, err)
    assert "does not exist" in err


def _limited_file_size(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # Python ignores SIGXFSZ: writes fail, EFBIG
    return apply


@pytest.mark.parametrize("command", REWRITES)
def test_write_error_leaves_nothing_behind(command, model_file, tmp_path):
    """A write that fails half-way (file size limit: the same path as a full disk) is reported in one
    line and leaves neither the output nor a temporary file."""
    if command == "lower":
        code, _, err = run_cli("binarize", model_file, "--stage", "transform", "-o", tmp_path / "t.onnx", "-q")
        assert code == 0, err
        model_file = tmp_path / "t.onnx"
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = command_args(command, model_file, out_dir / "o.onnx", None)
    result = subprocess.run([sys.executable, "-m", "onnxopt", *map(str, args)], capture_output=True, text=True,
                            preexec_fn=_limited_file_size(1000), timeout=300)
    assert_clean_refusal(result.returncode, result.stderr)
    assert "write failed" in result.stderr
    assert list(out_dir.iterdir()) == []


def test_full_disk_tmpfs(mlp_path, tmp_path):
    """A real ENOSPC on a tiny tmpfs, where the machine lets us mount one (root on Linux)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        code, _, err = run_cli(*command_args("factor", mlp_path, mount / "out.onnx", None), "--external-data")
        assert_clean_refusal(code, err)
        assert "write failed" in err and "No space left" in err
        assert list(mount.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def big_dense_model(path: Path, layers: int = 6, size: int = 1500):
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        inits.append(numpy_helper.from_array(rng.standard_normal((size, size)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"y{i}"], name=f"dense{i}"))
        x = f"y{i}"
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", 1, ["N", size])],
                              [helper.make_tensor_value_info(x, 1, ["N", size])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


@pytest.mark.slow
def test_sigint_during_factorization(tmp_path):
    src, out = tmp_path / "big.onnx", tmp_path / "out.onnx"
    big_dense_model(src)
    digest = sha256(src)
    # full LAPACK SVD at rank 0.9: seconds per layer, so the interrupt lands mid-run
    proc = subprocess.Popen([sys.executable, "-m", "onnxopt", "factor", str(src), "--rank", "0.9", "--allow-growth",
                             "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(4)
    assert proc.poll() is None, "finished before the interrupt; make the model bigger"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert err.strip() == "onnxopt: error: interrupted; nothing was written"
    assert sha256(src) == digest and not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["big.onnx"]


def lowered_cnn():
    model = KINDS["symbolic batch and spatial dims"]()
    return onnxopt.binarize_convolution(model), feeds_for(model, batch=3)


def test_eight_threads_share_one_lowered_session():
    lowered, _ = lowered_cnn()
    sess = onnxopt.session(lowered)
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((1 + i % 3, 4, 8, 8)).astype(np.float32) for i in range(8)]
    want = [sess.run(None, {"x": x})[0] for x in inputs]
    errors, results = [], {}

    def worker(i):
        try:
            for _ in range(25):
                got = sess.run(None, {"x": inputs[i]})[0]
                if not np.array_equal(got, want[i]):
                    errors.append(f"thread {i}: wrong result")
            results[i] = True
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"thread {i}: {exc}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 8, errors


@pytest.mark.parametrize("feed,text", [
    ({"x": np.zeros((2, 4, 8), np.float32)}, "shape"),
    ({"x": np.zeros((2, 3, 8, 8), np.float32)}, "shape"),
    ({"x": np.zeros((2, 4, 8, 8), np.float64)}, "dtype"),
    ({"x": np.zeros((2, 4, 8, 8), np.int64)}, "dtype"),
    ({"y": np.zeros((2, 4, 8, 8), np.float32)}, "unknown input"),
    ({"x": np.zeros((0, 4, 8, 8), np.float32)}, None),  # an empty batch is valid
    ({"x": np.full((1, 4, 8, 8), np.nan, np.float32)}, None),  # b(NaN) = -1, like any non-positive value
])
def test_wrong_feed_raises_in_python_and_never_aborts(feed, text):
    lowered, _ = lowered_cnn()
    sess = onnxopt.session(lowered)
    if text is None:
        (out,) = sess.run(None, feed)
        assert out.shape[0] == feed["x"].shape[0]
        return
    with pytest.raises((OnnxoptError, ValueError), match=text):
        sess.run(None, feed)
    assert sess.run(None, {"x": np.ones((1, 4, 8, 8), np.float32)})[0].shape == (1, 10)  # still alive


# ---- fuzzing: mutate valid models, run every command ----------------------------------------------------

FUZZ_BASES = ["weights as initializers", "Conv + BatchNormalization", "Conv1d", "IR 3, opset 9",
              "depthwise, grouped and 1x1 convs", "Gemm feeding Softmax", "weights as Constant nodes",
              "weights behind Reshape/ConstantOfShape chains", "Gemm/Conv/MatMul in If/Loop/Scan bodies",
              "symbolic batch and spatial dims"]
DTYPES = [onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.INT64, onnx.TensorProto.UINT8,
          onnx.TensorProto.BOOL, onnx.TensorProto.STRING]


@st.composite
def mutated_models(draw):
    model = KINDS[draw(st.sampled_from(FUZZ_BASES))]()
    g = model.graph
    for _ in range(draw(st.integers(1, 3))):
        what = draw(st.sampled_from(["drop_attr", "alter_attr", "add_attr", "init_dims", "init_dtype",
                                     "input_dims", "input_dtype", "drop_input", "swap_inputs", "op_type",
                                     "opset", "ir", "drop_node", "weight_values", "constant_dims",
                                     "drop_output", "rename_node", "domain"]))
        node = g.node[draw(st.integers(0, len(g.node) - 1))]
        if what == "drop_attr" and node.attribute:
            del node.attribute[draw(st.integers(0, len(node.attribute) - 1))]
        elif what == "alter_attr" and node.attribute:
            attr = node.attribute[draw(st.integers(0, len(node.attribute) - 1))]
            if attr.type == onnx.AttributeProto.INTS and attr.ints:
                attr.ints[draw(st.integers(0, len(attr.ints) - 1))] = draw(st.integers(-3, 9))
            elif attr.type == onnx.AttributeProto.INT:
                attr.i = draw(st.integers(-3, 9))
            elif attr.type == onnx.AttributeProto.FLOAT:
                attr.f = draw(st.sampled_from([0.0, -1.0, float("nan"), 1e30]))
        elif what == "add_attr":
            node.attribute.append(helper.make_attribute(draw(st.sampled_from(["group", "strides", "transB", "axis"])),
                                                        draw(st.sampled_from([2, [2, 2], 0]))))
        elif what in ("init_dims", "init_dtype", "weight_values") and g.initializer:
            t = g.initializer[draw(st.integers(0, len(g.initializer) - 1))]
            if what == "init_dims":
                t.dims[:] = draw(st.lists(st.integers(0, 9), min_size=0, max_size=5))
            elif what == "init_dtype":
                t.data_type = draw(st.sampled_from(DTYPES))
            else:
                try:
                    arr = numpy_helper.to_array(t).copy()
                except ValueError:  # an earlier mutation broke this tensor already
                    continue
                if arr.dtype.kind == "f" and arr.size:
                    arr.flat[0] = draw(st.sampled_from([np.nan, np.inf, 0.0, -0.0]))
                    t.CopyFrom(numpy_helper.from_array(arr, t.name))
        elif what == "input_dims":
            dims = g.input[0].type.tensor_type.shape.dim
            if dims:
                dims[draw(st.integers(0, len(dims) - 1))].dim_value = draw(st.integers(0, 5))
        elif what == "input_dtype":
            g.input[0].type.tensor_type.elem_type = draw(st.sampled_from(DTYPES))
        elif what == "drop_input" and len(node.input) > 1:
            del node.input[draw(st.integers(1, len(node.input) - 1))]
        elif what == "swap_inputs" and len(node.input) > 1:
            node.input[0], node.input[1] = node.input[1], node.input[0]
        elif what == "op_type":
            node.op_type = draw(st.sampled_from(["Conv", "Gemm", "MatMul", "Relu", "NoSuchOp"]))
        elif what == "opset":
            model.opset_import[0].version = draw(st.integers(1, 30))
        elif what == "ir":
            model.ir_version = draw(st.integers(0, 14))
        elif what == "drop_node" and len(g.node) > 1:
            del g.node[draw(st.integers(0, len(g.node) - 1))]
        elif what == "constant_dims":
            constants = [a.t for n in g.node if n.op_type == "Constant" for a in n.attribute
                         if a.type == onnx.AttributeProto.TENSOR]
            if constants:
                constants[draw(st.integers(0, len(constants) - 1))].dims[:] = draw(
                    st.lists(st.integers(0, 9), min_size=0, max_size=4))
        elif what == "drop_output" and len(g.output) > 0:
            del g.output[draw(st.integers(0, len(g.output) - 1))]
        elif what == "rename_node":
            node.name = draw(st.sampled_from(["", g.node[0].name, "a/b", "x" * 300]))
        elif what == "domain":
            node.domain = draw(st.sampled_from(["com.onnxopt", "ai.onnx.ml", "unknown.domain"]))
    return model


@pytest.fixture(scope="module")
def fuzz_runs():
    """Counts the fuzz test's command runs and prints the total once (visible with -s)."""
    runs = {"count": 0}
    yield runs
    print(f"\nfuzz: {runs['count']} command runs on mutated models, no traceback")


# CI runs the same 400 cases every time (derandomized); FUZZ_EXAMPLES=N explores N new random ones
@pytest.mark.slow
@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 400)), deadline=None, database=None,
          derandomize="FUZZ_EXAMPLES" not in os.environ,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(model=mutated_models())
def test_fuzzed_models_give_valid_output_or_clean_refusal(model, tmp_path_factory, fuzz_runs):
    tmp = tmp_path_factory.mktemp("fuzz")
    src = tmp / "m.onnx"
    src.write_bytes(model.SerializeToString())
    digest = sha256(src)
    feeds = tmp / "feeds.npz"
    np.savez(feeds, x=np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32))
    try:  # outputs must load in onnxruntime when the input runs (when it does not, `run` must refuse)
        onnxopt.session(model).run(None, {"x": np.zeros((2, 4, 8, 8), np.float32)})
        runnable = True
    except Exception:  # noqa: BLE001 - any failure: the mutation broke the model
        runnable = False
    for command in REWRITES + ("run", "inspect"):
        out = tmp / f"{command}.out"
        code, _, err = run_cli(*command_args(command, src, out, feeds))
        fuzz_runs["count"] += 1
        if code:
            assert_clean_refusal(code, err)
            assert not out.exists()
        else:
            assert "internal error" not in err
            if command in REWRITES:
                new = onnx.load(str(out))
                onnx.checker.check_model(new)
                assert new.ir_version == model.ir_version
                if runnable:
                    if os.environ.get("FUZZ_DUMP"):
                        try:
                            onnxopt.session(new)
                        except Exception:
                            onnx.save(model, os.environ["FUZZ_DUMP"])
                            raise
                    onnxopt.session(new)
        assert sha256(src) == digest
    assert not [p.name for p in tmp.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
@pytest.mark.huge
def test_model_over_2gb_with_external_data(tmp_path):
    """A 2.2 GB model (two 16384² weights plus one more) in external data, in and out: factor writes
    external data by itself (protobuf cannot hold 2 GiB), inspect and run read it."""
    size, rng = 16384, np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(3):
        rows = size if i < 2 else 512
        w = (rng.standard_normal((size, rows), dtype=np.float32) / np.sqrt(size)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"y{i}"], name=f"dense{i}"))
        x = f"y{i}"
        del w
    graph = helper.make_graph(nodes, "huge", [helper.make_tensor_value_info("x", 1, ["N", size])],
                              [helper.make_tensor_value_info(x, 1, ["N", 512])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    src = tmp_path / "huge.onnx"
    onnx.save_model(model, str(src), save_as_external_data=True, location="huge.onnx.data")
    del model, graph, inits
    assert (tmp_path / "huge.onnx.data").stat().st_size > 2**31
    digests = sha256(src), sha256(tmp_path / "huge.onnx.data")
    out = tmp_path / "out" / "factored.onnx"
    out.parent.mkdir()
    # only the last layer: the output keeps the two 1 GiB weights, so it must go to external data
    code, stdout, err = run_cli("factor", src, "--rank", "0.05", "--only", "dense2", "-o", out)
    assert code == 0, err
    assert (out.parent / "factored.onnx.data").stat().st_size > 2**31  # written external without being asked
    assert out.stat().st_size < 100_000
    onnx.checker.check_model(str(out))
    code, stdout, err = run_cli("inspect", src)
    assert code == 0 and "dense1" in stdout, err
    feeds = tmp_path / "feeds.npz"
    np.savez(feeds, x=rng.standard_normal((2, size)).astype(np.float32))
    code, _, err = run_cli("run", out, "--data", feeds, "-o", tmp_path / "outputs.npz")
    assert code == 0, err
    assert (sha256(src), sha256(tmp_path / "huge.onnx.data")) == digests


def hostile_table() -> str:
    """Markdown table: each hostile file × command → the one error line (for the closing note)."""
    import tempfile

    commands = REWRITES + ("run", "inspect")
    rows = ["| input | " + " | ".join(commands) + " |", "|---|" + "---|" * len(commands)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        feeds = tmp / "feeds.npz"
        np.savez(feeds, x=np.zeros((2, 4, 8, 8), np.float32))
        for name, path in hostile_files(tmp).items():
            cells = []
            for command in commands:
                code, _, err = run_cli(*command_args(command, path, tmp / "out.onnx", feeds))
                message = err.strip().splitlines()[-1].removeprefix("onnxopt: error: ").replace(str(path), "FILE")
                cells.append(f"exit {code}: {message}")
            rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
