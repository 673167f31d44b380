"""Issue 20's hostile-input findings, each as its reproduction then the fixed behaviour."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import MODELS, ROOT, assert_clean_refusal, run_cli, sha256
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

import onnxopt
from onnxopt.errors import OnnxoptError

HOOKS = "hookmods.trainhooks"
TRAINER = ROOT / "tests" / "hookmods" / "trainhooks.py"


def mlp_with_external_data(folder: Path, name: str, location: str) -> Path:
    model = onnx.load(str(MODELS / "mlp.onnx"))
    path = folder / name
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location)
    return path


# ---- 1. external data never clobbers a file -------------------------------------------------------------

def test_external_data_does_not_overwrite_the_inputs_data(tmp_path, monkeypatch):
    src = mlp_with_external_data(tmp_path, "a.onnx", "b.onnx.data")  # the input's data has the output's name
    before = sha256(tmp_path / "b.onnx.data")
    monkeypatch.chdir("/")  # from another directory, as reported
    code, _, err = run_cli("factor", src, "--rank", "0.5", "-o", tmp_path / "b.onnx", "--external-data")
    assert code == 0, err  # the output's data goes to a name of its own (b.onnx.<token>.data)
    assert sha256(tmp_path / "b.onnx.data") == before
    onnxopt.load_model(src)  # still readable
    onnxopt.load_model(tmp_path / "b.onnx")
    code, _, err = run_cli("factor", src, "--rank", "0.5", "-o", tmp_path / "b.onnx", "--external-data", "--force")
    assert code == 0, err
    assert sha256(tmp_path / "b.onnx.data") == before  # replacing b.onnx never removes the input's data
    onnxopt.load_model(src)


def test_existing_data_file_is_left_alone_and_cwd_does_not_matter(tmp_path, monkeypatch):
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    (out.parent / "m.onnx.data").write_bytes(b"someone else's data")
    code, _, err = run_cli("factor", MODELS / "mlp.onnx", "--rank", "0.5", "-o", out, "--external-data")
    assert code == 0 and (out.parent / "m.onnx.data").read_bytes() == b"someone else's data", err
    # an unrelated m.onnx.data in the current directory does not block writing outdir/m.onnx
    (out.parent / "m.onnx.data").unlink()
    out.unlink()
    for data in out.parent.glob("m.onnx.*.data"):
        data.unlink()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.onnx.data").write_bytes(b"unrelated")
    code, _, err = run_cli("factor", MODELS / "mlp.onnx", "--rank", "0.5", "-o", out, "--external-data")
    assert code == 0, err
    # re-running with --force from inside the output folder works
    monkeypatch.chdir(out.parent)
    code, _, err = run_cli("factor", MODELS / "mlp.onnx", "--rank", "0.5", "-o", "m.onnx", "--external-data", "--force")
    assert code == 0, err
    assert (tmp_path / "m.onnx.data").read_bytes() == b"unrelated"
    onnx.checker.check_model(str(out))


def test_output_equal_to_input_is_refused_even_with_force(tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes((MODELS / "mlp.onnx").read_bytes())
    os.symlink(src, tmp_path / "link.onnx")
    before = sha256(src)
    for target in (src, tmp_path / "link.onnx"):
        code, _, err = run_cli("factor", src, "--rank", "0.5", "-o", target, "--force")
        assert code == 2 and "is the input model" in err
    assert sha256(src) == before


# ---- 7. an output that is not a regular file --------------------------------------------------------------

def test_output_that_is_not_a_regular_file_is_refused(tmp_path):
    fifo = tmp_path / "pipe.onnx"
    os.mkfifo(fifo)
    code, _, err = run_cli("factor", MODELS / "mlp.onnx", "--rank", "0.5", "-o", fifo, "--force")
    assert code == 2 and "not a regular file" in err
    assert fifo.is_fifo()


# ---- 2 and 4. custom-op constants are validated before any kernel sees them -------------------------------

def emulated_with_per_tensor_scale(tmp_path) -> tuple[onnx.ModelProto, Path]:
    """The --emulate form with α and bias of shape [1]: valid in standard ops (they broadcast)."""
    model, _ = onnxopt.binarize(MODELS / "cnn.onnx", skip=["first_conv"], emulate=True)
    for t in model.graph.initializer:
        if t.name.endswith("binary_alpha") or t.name.endswith("binary_bias"):
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t)[:1].copy(), t.name))
    path = tmp_path / "emulated.onnx"
    onnx.save(model, str(path))
    return model, path


def test_per_tensor_alpha_in_emulated_form_is_broadcast_when_lowering(tmp_path):
    model, path = emulated_with_per_tensor_scale(tmp_path)
    x = np.load(MODELS / "cnn_test.npz")["input"][:64]
    want = onnxopt.session(model).run(None, {"input": x})[0]
    lowered, _ = onnxopt.lower(path, keep_batchnorm=True)
    got = onnxopt.session(lowered).run(None, {"input": x})[0]
    # the same ±1 sums scaled by the same constants: float32 summation order only (measured 0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def edited_binaryconv(tmp_path, edit) -> Path:
    model, _ = onnxopt.binarize(MODELS / "cnn.onnx", skip=["first_conv"], stage="transform")
    inits = {t.name: t for t in model.graph.initializer}
    edit(inits)
    path = tmp_path / "edited.onnx"
    onnx.save(model, str(path))
    return path


def _set(inits, suffix, fn):
    t = next(t for name, t in inits.items() if name.endswith(suffix))
    t.CopyFrom(numpy_helper.from_array(fn(numpy_helper.to_array(t).copy()), t.name))


def _geometry(index, value):
    def edit(inits):
        def change(g):
            g[index] = value
            return g
        _set(inits, "binary_geometry", change)
    return edit


CONSTANT_EDITS = {
    "short alpha": (lambda i: _set(i, "binary_alpha", lambda a: a[:1]), "alpha must be float32 of shape"),
    "short bias": (lambda i: _set(i, "binary_bias", lambda a: a[:3]), "bias must be float32 of shape"),
    "infinite alpha": (lambda i: _set(i, "binary_alpha", lambda a: a * np.float32(np.inf)), "NaN or infinite"),
    "stride 0": (_geometry(1, 0), "strides"),
    "dilation 0": (_geometry(8, 0), "dilations"),
    "negative pad": (_geometry(3, -2), "pads"),
    "huge pad": (_geometry(4, 1 << 40), "pads"),
    "channels differ": (_geometry(10, 65), "input channels"),
    "short geometry": (lambda i: _set(i, "binary_geometry", lambda g: g[:5]), "geometry must be 11 int64"),
}


@pytest.mark.parametrize("case", CONSTANT_EDITS)
def test_invalid_custom_op_constants_are_refused(tmp_path, case):
    edit, text = CONSTANT_EDITS[case]
    path = edited_binaryconv(tmp_path, edit)
    code, _, err = run_cli("lower", path, "-o", tmp_path / "l.onnx")
    assert_clean_refusal(code, err)
    assert text in err and not (tmp_path / "l.onnx").exists()
    with pytest.raises(OnnxoptError, match=text):  # and at session creation
        onnxopt.session(path)


# ---- 3. small or empty spatial sizes never kill the process -----------------------------------------------

def two_layer_symbolic(rng) -> onnx.ModelProto:
    """x [N, 8, H, W] → Conv 3x3 → MaxPool 2 → Conv 3x3 → Relu, every conv binarizable, H and W symbolic."""
    w1 = numpy_helper.from_array(rng.standard_normal((16, 8, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((8, 16, 3, 3)).astype(np.float32), "w2")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="c1"),
             helper.make_node("MaxPool", ["c1"], ["p1"], name="p1", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p1", "w2"], ["c2"], name="c2"),
             helper.make_node("Relu", ["c2"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                         ["N", 8, "H", "W"])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 8, "h", "w"])],
                              [w1, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture(scope="module")
def lowered_two_layer():
    lowered, _ = onnxopt.binarize(two_layer_symbolic(np.random.default_rng(0)))
    assert [n.op_type for n in lowered.graph.node].count("BitConv") == 2
    return lowered


# c1 (3x3) → pool 2 → c2 (3x3): 8x8 → 6x6 → 3x3 → 1x1; 6x6 → 4x4 → 2x2 → nothing
@pytest.mark.parametrize("hw,ok", [((8, 8), True), ((9, 11), True), ((10, 10), True), ((2, 8), False),
                                   ((8, 1), False), ((0, 8), False), ((5, 5), False), ((6, 6), False)])
def test_spatial_sizes_raise_in_python(lowered_two_layer, hw, ok):
    sess = onnxopt.session(lowered_two_layer)
    x = np.ones((2, 8, *hw), np.float32)
    if ok:
        assert sess.run(None, {"x": x})[0].shape[0] == 2
    else:
        with pytest.raises(OnnxoptError, match="cannot run on this feed"):
            sess.run(None, {"x": x})
    assert sess.run(None, {"x": np.ones((1, 8, 8, 8), np.float32)})[0].shape == (1, 8, 1, 1)  # still alive


def test_run_command_refuses_small_input(lowered_two_layer, tmp_path):
    onnx.save(lowered_two_layer, str(tmp_path / "l.onnx"))
    np.savez(tmp_path / "x.npz", x=np.ones((1, 8, 2, 2), np.float32))
    code, _, err = run_cli("run", tmp_path / "l.onnx", "--data", tmp_path / "x.npz")
    assert_clean_refusal(code, err)
    assert "smaller than the 3x3 kernel" in err


@pytest.mark.slow
def test_plain_onnxruntime_session_survives_a_bad_feed(lowered_two_layer, tmp_path):
    """A user's own InferenceSession (no feed guard): the op answers with an empty output, never an abort."""
    path = tmp_path / "l.onnx"
    onnx.save(lowered_two_layer, str(path))
    code = f"""
import numpy as np, onnxruntime as ort, onnxopt
sess = ort.InferenceSession({str(path)!r}, onnxopt.session_options(), providers=["CPUExecutionProvider"])
for hw in [(2, 2), (0, 8), (4, 4)]:
    try:
        out = sess.run(None, {{"x": np.ones((1, 8) + hw, np.float32)}})[0]
        print("shape", out.shape)
    except Exception as exc:
        print("error", type(exc).__name__)
print("alive", sess.run(None, {{"x": np.ones((1, 8, 8, 8), np.float32)}})[0].shape)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "alive (1, 8, 1, 1)" in r.stdout and "returning an empty output" in r.stderr


# ---- 5. memory bombs ------------------------------------------------------------------------------------

def bomb_model(nodes: int, feeds_weight: bool) -> onnx.ModelProto:
    shape = numpy_helper.from_array(np.array([20000, 20000], np.int64), "shape")
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    fill = numpy_helper.from_array(np.ones(1, np.float32), "fill")
    body = [helper.make_node("ConstantOfShape", ["shape"], [f"big{i}"], name=f"big{i}", value=fill)
            for i in range(nodes)]
    weight = "big0" if feeds_weight else "w"
    body.append(helper.make_node("MatMul", ["x", weight], ["y"], name="mm"))
    x_shape = [1, 20000] if feeds_weight else [1, 4]
    graph = helper.make_graph(body, "bomb", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, "n"])], [shape, w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _peak_rss_mb(args) -> tuple[int, float, str]:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent (pytest) across fork and exec
    code = ("import sys; from onnxopt.cli import main\ncode = 0\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
            "hwm = [line for line in open('/proc/self/status') if line.startswith('VmHWM')][0].split()[1]\n"
            "print('RSS', int(hwm) / 1024, 'CODE', code)")
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300)
    words = r.stdout.split()
    return int(words[words.index("CODE") + 1]), float(words[words.index("RSS") + 1]), r.stderr


@pytest.mark.slow
def test_unused_constant_of_shape_is_never_materialized(tmp_path):
    path = tmp_path / "bomb.onnx"
    onnx.save(bomb_model(8, feeds_weight=False), str(path))
    assert path.stat().st_size < 20_000
    for args in (["inspect", path], ["factor", path, "--rank", "1", "-o", tmp_path / "f.onnx"]):
        code, rss, err = _peak_rss_mb(args)
        assert code == 0, err
        assert rss < 600, f"{args[0]}: peak RSS {rss:.0f} MB"  # each node would be 1.6 GB


def test_oversized_folded_weight_is_refused(tmp_path):
    path = tmp_path / "bomb.onnx"
    onnx.save(bomb_model(1, feeds_weight=True), str(path))
    code, rss, err = _peak_rss_mb(["factor", path, "--rank", "1", "-o", tmp_path / "f.onnx"])
    assert code == 1 and "folds constants up to" in err and rss < 600


@pytest.mark.slow
def test_a_chain_of_folds_is_bounded_in_all(tmp_path):
    """ConstantOfShape 4096² then 40 Casts feeding a weight: each fold was bounded alone, so a 1.3 KB model took
    4.1 GB and 74 s. The total is bounded now: refused at the cap, peak RSS measured."""
    shape = numpy_helper.from_array(np.array([4096, 4096], np.int64), "shape")
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["c0"], value=numpy_helper.from_array(
        np.ones(1, np.float32), "fill"))]
    for i in range(40):
        to = onnx.TensorProto.DOUBLE if i % 2 == 0 else onnx.TensorProto.FLOAT
        nodes.append(helper.make_node("Cast", [f"c{i}"], [f"c{i + 1}"], to=to))
    nodes.append(helper.make_node("MatMul", ["x", "c40"], ["y"], name="mm"))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4096])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4096])], [shape])
    path = tmp_path / "chain.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    assert path.stat().st_size < 2000
    code, rss, err = _peak_rss_mb(["factor", path, "--rank", "0.5", "-o", tmp_path / "f.onnx"])
    print(f"\nfold chain: exit {code}, peak RSS {rss:.0f} MB")
    assert code == 1 and "folds constants up to" in err and "in all" in err, err
    assert rss < 1800


# ---- 6. signals, timeouts, process groups ---------------------------------------------------------------

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


@pytest.mark.slow
def test_sigterm_during_train_cmd_kills_the_trainer_group_and_cleans_up(tmp_path):
    pidfile, scratch = tmp_path / "pids", tmp_path / "tmp"
    scratch.mkdir()
    env = dict(os.environ, ONNXOPT_TEST_PIDFILE=str(pidfile), TMPDIR=str(scratch))
    cmd = f"{sys.executable} {TRAINER} spawn {{input}} {{output}}"
    proc = subprocess.Popen([sys.executable, "-m", "onnxopt", "binarize", MODELS / "cnn.onnx", "--skip", "first_conv",
                             "--train-cmd", cmd, "-o", tmp_path / "out.onnx"], env=env, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while not pidfile.exists() or not pidfile.read_text().endswith("\n"):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    trainer, grandchild = map(int, pidfile.read_text().split())
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "terminated; nothing was written" in err
    time.sleep(0.5)
    assert not _alive(trainer) and not _alive(grandchild)
    assert not list(scratch.iterdir()) and not (tmp_path / "out.onnx").exists()


@pytest.mark.slow
def test_train_timeout_for_commands_and_hooks(tmp_path):
    cmd = f"{sys.executable} {TRAINER} spawn {{input}} {{output}}"
    env_pid = tmp_path / "pids"
    os.environ["ONNXOPT_TEST_PIDFILE"] = str(env_pid)
    try:
        start = time.time()
        code, _, err = run_cli("binarize", MODELS / "cnn.onnx", "--skip", "first_conv", "--train-cmd", cmd,
                               "--train-timeout", "3", "-o", tmp_path / "a.onnx")
        assert code == 1 and "timed out after 3 s" in err and time.time() - start < 60
        time.sleep(0.5)
        assert not any(_alive(int(p)) for p in env_pid.read_text().split())
    finally:
        del os.environ["ONNXOPT_TEST_PIDFILE"]
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        code, _, err = run_cli("binarize", MODELS / "cnn.onnx", "--skip", "first_conv", "--train-hook",
                               f"{HOOKS}:sleep", "--train-timeout", "1", "-o", tmp_path / "b.onnx")
    finally:
        sys.path.remove(str(ROOT / "tests"))
    assert code == 1 and "training hook timed out after 1 s" in err and not (tmp_path / "b.onnx").exists()


def test_sigterm_mid_write_leaves_no_partial_file(tmp_path):
    """SIGTERM while the model is being saved: exit 143, no temp folder or partial output."""
    code = f"""
import os, signal, onnx, sys
from onnxopt.graph import io as m
real = onnx.save_model
def slow(*a, **k):
    real(*a, **k)
    os.kill(os.getpid(), signal.SIGTERM)  # arrives after the temp file is written, before the rename
onnx.save_model = slow
from onnxopt.cli import main
main(["factor", {str(MODELS / 'mlp.onnx')!r}, "--rank", "0.5", "-o", {str(tmp_path / 'out.onnx')!r}])
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 143, r.stderr
    assert not list(tmp_path.iterdir())


# ---- 8. the hook contract -----------------------------------------------------------------------------

@pytest.mark.parametrize("hook,text", [
    ("change_attribute", "attributes of node"),
    ("infinite_alpha", "alpha has NaN or infinite values"),
    ("external_data", "points at external data"),
    ("stride_zero", "strides"),
])
def test_hooks_may_change_values_only(tmp_path, hook, text):
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        code, _, err = run_cli("binarize", MODELS / "cnn.onnx", "--skip", "first_conv", "--train-hook",
                               f"{HOOKS}:{hook}", "-o", tmp_path / "out.onnx")
    finally:
        sys.path.remove(str(ROOT / "tests"))
    assert_clean_refusal(code, err)
    assert text in err and "internal error" not in err and not (tmp_path / "out.onnx").exists()


# ---- the fuzzer, on custom-op constants and on spatial sizes of lowered models -------------------------

@st.composite
def mutated_lowered(draw):
    model = onnx.ModelProto()
    model.CopyFrom(LOWERED)
    inits = [t for t in model.graph.initializer if "/" in t.name]  # the rewrite's constants, not raw weights
    for _ in range(draw(st.integers(1, 3))):
        t = draw(st.sampled_from(inits))
        a = numpy_helper.to_array(t).copy()
        how = draw(st.sampled_from(["value", "truncate", "extend", "nonfinite"]))
        if how == "value" and a.size:
            flat = a.reshape(-1)
            i = draw(st.integers(0, flat.size - 1))
            values = {"i": [0, -1, 1, 2, 64, 65, 1 << 20, -(1 << 40)], "u": [0, 1, (1 << 64) - 1]}
            flat[i] = draw(st.sampled_from(values.get(a.dtype.kind, [0.0, -1.0, 1e30])))
        elif how == "truncate":
            a = a.reshape(-1)[: draw(st.integers(0, max(a.size - 1, 0)))]
        elif how == "extend":
            a = np.concatenate([a.reshape(-1), a.reshape(-1)[:3]])
        elif a.dtype.kind == "f" and a.size:
            a.reshape(-1)[0] = np.nan
        t.CopyFrom(numpy_helper.from_array(a, t.name))
    return model


LOWERED = onnxopt.binarize(two_layer_symbolic(np.random.default_rng(1)))[0]


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 150)), deadline=None, database=None,
          derandomize="FUZZ_EXAMPLES" not in os.environ, suppress_health_check=[HealthCheck.too_slow])
@given(model=mutated_lowered(), h=st.integers(0, 12), w=st.integers(0, 12), n=st.integers(0, 2))
def test_fuzzed_custom_op_constants_and_spatial_sizes_never_abort(model, h, w, n):
    x = np.random.default_rng(0).standard_normal((n, 8, h, w)).astype(np.float32)
    try:
        sess = onnxopt.session(model)
    except OnnxoptError:
        return  # refused at session creation: the constants were judged
    try:
        (y,) = sess.run(None, {"x": x})
    except OnnxoptError:
        return  # refused before the op ran
    assert y.shape[0] == n  # ran: it was a valid feed


TRANSFORMED = onnxopt.binarize(two_layer_symbolic(np.random.default_rng(1)), stage="transform")[0]


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 60)), deadline=None, database=None,
          derandomize="FUZZ_EXAMPLES" not in os.environ, suppress_health_check=[HealthCheck.too_slow])
@given(h=st.integers(0, 14), w=st.integers(0, 14), n=st.integers(0, 3))
def test_spatial_sizes_of_a_valid_lowered_model(h, w, n):
    """Every size either runs, equal to the float emulation (BinaryConv) bit for bit, or is refused by both."""
    x = np.random.default_rng(h * 100 + w).standard_normal((n, 8, h, w)).astype(np.float32)
    results = []
    for model in (LOWERED, TRANSFORMED):
        try:
            results.append(onnxopt.session(model).run(None, {"x": x})[0])
        except OnnxoptError as exc:
            results.append(str(exc).split(":")[0])
    lowered, emulated = results
    if isinstance(lowered, str) or isinstance(emulated, str):
        assert isinstance(lowered, str) and isinstance(emulated, str), (h, w, results)
        assert min(h, w) < 8  # 8x8 is the smallest input both layers take
    else:
        assert np.array_equal(lowered, emulated)
