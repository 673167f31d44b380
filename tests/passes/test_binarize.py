"""binarize / lower: BinaryConv against onnxruntime's Conv, BitConv against BinaryConv bit for bit."""
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import accuracy, conv_model, load_split, ort_run
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from kernel_cases import CHANNELS, conv_cases

import onnxopt
from onnxopt.kernels import AVX2_ONLY_ENV, bitconv, reference
from onnxopt.kernels.geometry import Geometry
from onnxopt.kernels.packing import pack_weights


def sign(v):
    return np.where(v > 0, 1.0, -1.0).astype(np.float32)


GEOMETRIES = [
    dict(pads=[1, 1, 1, 1]),
    dict(pads=[0, 2, 1, 0], strides=[2, 1], dilations=[1, 2]),
    dict(auto_pad="SAME_UPPER", strides=[2, 2]),
    dict(auto_pad="SAME_LOWER", strides=[1, 2]),
    dict(auto_pad="VALID", dilations=[2, 2]),
    dict(),
]


@pytest.mark.slow
@pytest.mark.parametrize("attrs", GEOMETRIES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_binary_conv_equals_ort_conv_on_binarized_tensors(rng, attrs, with_bias):
    w = rng.standard_normal((12, 70, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(12).astype(np.float32) if with_bias else None
    x = rng.standard_normal((2, 70, 11, 9)).astype(np.float32)
    model = conv_model(w, bias, **attrs)
    transformed = onnxopt.convert_to_binary_convolution(model)
    assert [n.op_type for n in transformed.graph.node] == ["BinaryConv"]
    alpha = np.abs(w).reshape(12, -1).mean(1)
    # the same layer with pre-binarized weights and scaled by alpha, run by onnxruntime's own Conv
    expected_model = conv_model((sign(w) * alpha[:, None, None, None]).astype(np.float32), bias, **attrs)
    (want,) = ort_run(expected_model, {"X": sign(x)})
    (got,) = ort_run(transformed, {"X": x})
    # float summation order differs (ORT sums α·(±1) terms, BinaryConv scales an exact integer sum once)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    lowered = onnxopt.convert_to_native_binary_convolution(transformed)
    assert [n.op_type for n in lowered.graph.node] == ["BitConv"]
    (bits,) = ort_run(lowered, {"X": x})
    assert np.array_equal(bits, got)


@pytest.mark.slow
@settings(max_examples=320, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=CHANNELS, o=st.integers(1, 150), case=conv_cases(max_stride=3), n=st.integers(1, 3),
       auto=st.sampled_from(["NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]), seed=st.integers(0, 2**31))
def test_bitconv_kernel_matches_reference_exactly(c, o, case, n, auto, seed):
    """Zero mismatches between the numba kernel and the float emulation over random geometries: channel
    counts across word, tile and job-group boundaries, rows shorter and longer than a vector, kernels of up to
    130 taps along an axis with pads up to half of it."""
    rng = np.random.default_rng(seed)
    spans = [(k - 1) * d + 1 for k, d in zip(case.kernel, case.dilations)]
    assume(not (auto == "VALID" and any(size < span for size, span in zip(case.sizes, spans))))  # no output fits
    x = rng.standard_normal((n, c, *case.sizes)).astype(np.float32)
    x[rng.random(x.shape) < 0.1] = 0.0  # b(0) = -1: zeros must take the negative branch
    w = rng.standard_normal((o, c, *case.kernel)).astype(np.float32)
    alpha = rng.random(o).astype(np.float32)
    bias = rng.standard_normal(o).astype(np.float32)
    g = case.geometry(c, auto)
    want = reference.binary_conv(x, w, alpha, bias, g.encode())
    got = bitconv.bit_conv(x, pack_weights(w), alpha, bias, g.encode())
    assert got.shape == want.shape
    assert np.array_equal(got, want)


@pytest.mark.parametrize("taps, pad", [(65, 32), (100, 50), (130, 65), (129, 0)])
def test_long_conv1d_is_exact(taps, pad):
    """Conv1d past 64 taps with padding: the padded-tap pattern was an int64 bit mask (1 << 65 wrapped), off by
    5 on outputs of ~40 at 65 taps and by 136 at 100."""
    rng = np.random.default_rng(taps)
    x = rng.standard_normal((2, 65, 150)).astype(np.float32)
    w = rng.standard_normal((7, 65, taps)).astype(np.float32)
    alpha, bias = rng.random(7).astype(np.float32), rng.standard_normal(7).astype(np.float32)
    g = Geometry.from_conv({"pads": [pad, pad]}, 1, 65).encode()
    want = reference.binary_conv(x, w, alpha, bias, g)
    got = bitconv.bit_conv(x[:, :, None, :], pack_weights(w[:, :, None, :]), alpha, bias, g)  # Conv1d: height 1
    assert np.array_equal(got[:, :, 0, :], want)
    model = conv_model(w, bias, pads=[pad, pad])
    lowered = onnxopt.convert_to_native_binary_convolution(onnxopt.convert_to_binary_convolution(model))
    (got,) = ort_run(lowered, {"X": x})
    transformed = onnxopt.convert_to_binary_convolution(model)
    (emulated,) = ort_run(transformed, {"X": x})
    assert np.array_equal(got, emulated)


def _host_has_avx2() -> bool:
    try:
        return platform.machine() in ("x86_64", "AMD64") and " avx2" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _host_has_avx2(), reason="needs an x86-64 CPU with AVX2")
def test_bitconv_kernel_exact_in_avx2_only_code():
    """The same property test on the code numba emits without AVX-512 (popcount by byte shuffles)."""
    if os.environ.get("NUMBA_CPU_NAME"):
        pytest.skip("already running with a fixed CPU target")
    env = {**os.environ, **AVX2_ONLY_ENV}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "slow or not slow",
                             f"{__file__}::test_bitconv_kernel_matches_reference_exactly"],
                            env=env, capture_output=True, text=True, cwd=Path(__file__).parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "1 passed" in result.stdout


@pytest.mark.slow
@pytest.mark.skipif(not _host_has_avx2(), reason="needs an x86-64 CPU with AVX2")
def test_kernels_exact_with_the_other_register_tile(tmp_path):
    """The host's tile is tested above; this runs the kernels' property tests (1-bit, multi-bit, packed-bit chains)
    on the other one (ONNXOPT_KERNEL_TILE; its own numba cache), so both tiles are checked on any x86 machine."""
    if os.environ.get("ONNXOPT_KERNEL_TILE") or os.environ.get("NUMBA_CPU_NAME"):
        pytest.skip("already running with a fixed tile or CPU target")
    other = "narrow" if bitconv.WIDE else "wide"
    env = {**os.environ, "ONNXOPT_KERNEL_TILE": other, "NUMBA_CACHE_DIR": str(tmp_path)}
    tests = [f"{__file__}::test_bitconv_kernel_matches_reference_exactly",
             f"{Path(__file__).parent / 'test_multibit.py'}::test_lowered_kernel_equals_the_definition",
             f"{Path(__file__).parents[1] / 'runtime' / 'test_chain.py'}::test_chained_kernels_equal_the_float_layers"]
    code = f"from onnxopt.kernels import bitconv; assert bitconv.WIDE == {other == 'wide'}"
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0
    pytest_cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "slow or not slow"]
    result = subprocess.run([*pytest_cmd, *tests],
                            env=env, capture_output=True, text=True, cwd=Path(__file__).parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "3 passed" in result.stdout


def test_conv1d_binarized_and_lowered(rng):
    w = rng.standard_normal((8, 5, 3)).astype(np.float32)
    model = conv_model(w, np.zeros(8, np.float32), pads=[1, 2], strides=[2])
    x = rng.standard_normal((2, 5, 13)).astype(np.float32)
    transformed = onnxopt.convert_to_binary_convolution(model)
    alpha = np.abs(w).reshape(8, -1).mean(1)
    want_model = conv_model((sign(w) * alpha[:, None, None]).astype(np.float32), np.zeros(8, np.float32),
                            pads=[1, 2], strides=[2])
    (want,) = ort_run(want_model, {"X": sign(x)})
    (got,) = ort_run(transformed, {"X": x})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    (bits,) = ort_run(onnxopt.convert_to_native_binary_convolution(transformed), {"X": x})
    assert np.array_equal(bits, got)


@pytest.mark.parametrize("make,reason", [
    (lambda r: conv_model(r.standard_normal((8, 1, 3, 3)).astype(np.float32), group=8), "depthwise"),
    (lambda r: conv_model(r.standard_normal((8, 2, 3, 3)).astype(np.float32), group=4), "grouped"),
    (lambda r: conv_model(r.standard_normal((8, 2, 3, 3, 3)).astype(np.float32)), "3-D convolution"),
    (lambda r: conv_model(r.standard_normal((8, 2, 3, 3)).astype(np.float16),
                          input_shape=[1, 2, 5, 5]), "not float32"),
])
def test_declined_convs_say_why(rng, make, reason):
    model = make(rng)
    out, report = onnxopt.binarize_with_report(model)
    assert report.layers[0].action == "skipped"
    assert reason in report.layers[0].reason
    assert [n.op_type for n in out.graph.node] == ["Conv"]


@pytest.mark.slow
def test_sample_cnn_skip_first_conv_and_accuracy(cnn_path, capsys):
    model = onnxopt.load_model(cnn_path)
    x, y = load_split("cnn", "test")
    transformed, report = onnxopt.binarize_with_report(model, skip=["first_conv"], stage="transform")
    kinds = {n.name: n.op_type for n in transformed.graph.node if "Conv" in n.op_type}
    assert kinds == {"/first_conv/Conv": "Conv", "/conv2/Conv": "BinaryConv", "/conv3/Conv": "BinaryConv"}
    assert transformed.ir_version == model.ir_version
    assert {(o.domain, o.version) for o in transformed.opset_import} == \
        {(o.domain, o.version) for o in model.opset_import} | {("com.onnxopt", 1)}
    lowered, lower_report = onnxopt.lower_with_report(transformed)
    onnx.checker.check_model(lowered)
    (t_out,) = ort_run(transformed, {"input": x})
    (l_out,) = ort_run(lowered, {"input": x})
    assert np.array_equal(l_out, t_out)
    t = lower_report.totals()
    assert t["bytes_before"] / t["bytes_after"] >= 30
    acc_float, acc_bin = accuracy(model, x, y), accuracy(lowered, x, y)
    with capsys.disabled():
        print(f"\ncnn accuracy on held-out split: float {acc_float:.4f}, binarized (no recovery) {acc_bin:.4f}; "
              f"binarized weights {t['bytes_before']:,} B -> {t['bytes_after']:,} B")
    assert acc_float > 0.95 and acc_bin > 0.1


def test_skip_matches_plain_node_name(rng):
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    model = conv_model(w, name="first_conv")
    out, report = onnxopt.binarize_with_report(model, skip=["first_conv"])
    assert report.layers[0].reason == "--skip 'first_conv'"


def test_wrong_feed_raises_and_process_survives(cnn_path, tmp_path):
    lowered = onnxopt.binarize_convolution(onnxopt.load_model(cnn_path), skip=["first_conv"])
    sess = onnxopt.session(lowered)
    good = np.zeros((2, 1, 28, 28), np.float32)
    with pytest.raises(onnxopt.OnnxoptError, match="shape"):
        sess.run(None, {"input": np.zeros((2, 3, 28, 28), np.float32)})
    with pytest.raises(onnxopt.OnnxoptError, match="dtype"):
        sess.run(None, {"input": good.astype(np.float64)})
    assert sess.run(None, {"input": good})[0].shape == (2, 10)


def test_session_options_for_user_code(cnn_path, tmp_path):
    import onnxruntime as ort

    path = tmp_path / "lowered.onnx"
    onnxopt.save_model(onnxopt.binarize_convolution(onnxopt.load_model(cnn_path), skip=["first_conv"]), path)
    sess = ort.InferenceSession(str(path), onnxopt.session_options(), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"input": np.zeros((1, 1, 28, 28), np.float32)})[0].shape == (1, 10)


def _conv_model(in_if: bool):
    """x → Conv(w) at the top level, or inside both branches of an If (weight outside the branch)."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 4, 3, 3)).astype(np.float32), "w")
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])]
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])
    if not in_if:
        graph = helper.make_graph([conv], "g", inputs, [output], [w])
    else:
        def branch(name):
            return helper.make_graph([conv], name, [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
        graph = helper.make_graph(
            [helper.make_node("If", ["c"], ["y"], name="if", then_branch=branch("then"), else_branch=branch("else"))],
            "g", inputs + [helper.make_tensor_value_info("c", TensorProto.BOOL, [])], [output], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_emulate_binarizes_layers_in_if_branches():
    """onnxruntime cannot load com.onnxopt ops inside an If branch, so binarize declined If-branch layers even
    with --emulate, which writes standard ops. Now --emulate takes them (the model loads) and each branch
    computes exactly what the same conv binarized at the top level computes; without --emulate the reason
    names --emulate."""
    x = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    top, _ = onnxopt.binarize(_conv_model(False), emulate=True)
    (want,) = onnxopt.session(top).run(None, {"x": x})
    branched, report = onnxopt.binarize(_conv_model(True), emulate=True)
    assert sorted(x.name for x in report.changed) == ["if/else_branch/conv", "if/then_branch/conv"]
    for c in (True, False):
        (got,) = onnxopt.session(branched).run(None, {"x": x, "c": np.array(c)})
        assert np.array_equal(got, want)
    _, report = onnxopt.binarize(_conv_model(True))
    assert not report.changed and "--emulate" in report.layers[0].reason
