"""Multi-bit residual binarization (binarize --weight-bits / --activation-bits / --bits-for): the semantics in
kernels/reference.py (the float64 oracle), the bit-serial lowered kernel, the ops in onnxruntime."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import MODELS, cli
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_cases import CHANNELS, conv_cases

from onnxopt import api
from onnxopt.kernels import multibit, packing, reference
from onnxopt.kernels.geometry import Geometry


def _lowered_inputs(w, levels_w):
    planes, scales = reference.residual_planes(w, levels_w)
    return np.concatenate([packing.pack_weights(p) for p in planes], axis=3), scales.astype(np.float32)


@pytest.mark.slow
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), kw=st.integers(1, 3), ka=st.integers(1, 3), c=CHANNELS, o=st.integers(1, 20),
       case=conv_cases(max_k=5), batch=st.integers(1, 3))
def test_lowered_kernel_equals_the_definition(seed, kw, ka, c, o, case, batch):
    """Bit-serial kernel vs the float64 oracle, rel <= 1e-5 of the output's largest magnitude (the kernel sums
    integers exactly and scales once; the oracle multiplies the float approximations: rounding only). The
    samples of a batch differ by orders of magnitude, so a scale shared across samples would fail. Kernels up
    to 130 taps along an axis."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, c, *case.sizes)).astype(np.float32)
    x *= np.logspace(-2, 2, batch, dtype=np.float32).reshape(-1, 1, 1, 1)
    w = rng.normal(size=(o, c, *case.kernel)).astype(np.float32)
    g = case.geometry(c)
    geometry = np.append(g.encode(), ka).astype(np.int64)
    wp, alpha = _lowered_inputs(w, kw)
    bias = rng.normal(size=o).astype(np.float32)
    want = reference.multibit_conv(x, w, alpha, bias, geometry)
    got = multibit.multibit_bit_conv(x, wp, alpha, bias, geometry)
    for n in range(batch):  # per sample: each sample's own scale
        scale = max(np.abs(want[n]).max(), 1e-6)
        assert np.abs(got[n] - want[n]).max() <= 1e-5 * scale


@pytest.mark.slow
@pytest.mark.parametrize("taps, pad", [(65, 32), (100, 50)])
def test_long_conv1d_equals_the_definition(taps, pad):
    """Past 64 taps with padding (where an int64 padding mask wrapped): 2x2 bits, Conv1d."""
    rng = np.random.default_rng(taps)
    x, w = rng.normal(size=(2, 65, 1, 140)).astype(np.float32), rng.normal(size=(5, 65, 1, taps)).astype(np.float32)
    geometry = np.append(Geometry.from_conv({"pads": [pad, pad]}, 1, 65).encode(), 2).astype(np.int64)
    wp, alpha = _lowered_inputs(w, 2)
    bias = rng.normal(size=5).astype(np.float32)
    want = reference.multibit_conv(x[:, :, 0], w[:, :, 0], alpha, bias, geometry)
    got = multibit.multibit_bit_conv(x, wp, alpha, bias, geometry)[:, :, 0]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_one_by_one_is_todays_op_and_file():
    default, _ = api.binarize(MODELS / "cnn.onnx", skip=["first_conv"], stage="transform")
    explicit, _ = api.binarize(MODELS / "cnn.onnx", skip=["first_conv"], stage="transform", weight_bits=1,
                               activation_bits=1)
    assert default.SerializeToString() == explicit.SerializeToString()
    assert {n.op_type for n in default.graph.node} >= {"BinaryConv"}


@pytest.mark.slow
@pytest.mark.parametrize("kw, ka, floor", [(1, 2, 0.90), (2, 2, 0.91), (1, 4, 0.94)])
def test_accuracy_and_lowered_equals_transformed(kw, ka, floor):
    """Held-out digits, no recovery (float 0.971; 1x1: 0.560): 1x2 0.928, 2x2 0.935, 1x4 0.951."""
    transformed, report = api.binarize(MODELS / "cnn.onnx", skip=["first_conv"], weight_bits=kw,
                                       activation_bits=ka, stage="transform", data=MODELS / "cnn_test.npz")
    assert report.check["score"]["candidate"] >= floor
    assert {x.action for x in report.changed} == {f"binarized {kw}x{ka} bits"}
    lowered, lowered_report = api.lower(transformed)
    assert [n.op_type for n in lowered.graph.node].count("MultibitBitConv") == 2
    onnx.checker.check_model(lowered)
    assert api.check(transformed, lowered, data=MODELS / "cnn_test.npz")["max_rel"] <= 1e-5
    for row in lowered_report.changed:  # Kw bits per weight: >= 32/Kw x smaller (64 input channels: exactly)
        assert row.bytes_before / row.bytes_after >= 32 / kw


def test_bits_for_overrides_per_layer():
    transformed, report = api.binarize(MODELS / "cnn.onnx", skip=["first_conv"], bits_for=["conv3=2x2"],
                                       activation_bits=2, stage="transform")
    assert {x.name: x.action for x in report.changed} == {"/conv2/Conv": "binarized 1x2 bits",
                                                          "/conv3/Conv": "binarized 2x2 bits"}


@pytest.mark.slow
def test_calibration_refit_runs_on_multibit_layers():
    _, report = api.binarize(MODELS / "cnn.onnx", skip=["first_conv"], activation_bits=4,
                             calibration=MODELS / "cnn_calib.npz", data=MODELS / "cnn_test.npz")
    assert "refit" in report.steps and report.check["score"]["candidate"] >= 0.93


@pytest.mark.parametrize("args, text", [
    (["--weight-bits", "0"], "invalid --weight-bits 0"),
    (["--activation-bits", "9"], "invalid --activation-bits 9"),
    (["--bits-for", "conv2=2y2"], "invalid --bits-for levels '2y2'"),
    (["--bits-for", "conv9=2x2"], "--bits-for pattern 'conv9' matches no"),
])
def test_bad_bits(tmp_path, args, text):
    out = tmp_path / "b.onnx"
    r = cli("binarize", MODELS / "cnn.onnx", "--skip", "first_conv", *args, "-o", out)
    assert r.returncode == 2 and text in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()


def test_emulated_form_in_standard_ops():
    """--emulate writes the levels in standard ops (ReduceMean/Abs/Where/Sub per level): plain onnxruntime runs it
    and it gives the transformed model's outputs: float32 residual means on both sides, summed in different
    orders, so a residual within rounding of 0 can take the other sign in one of them and flip that bit
    (seen: 8.6e-4 of the largest logit); most outputs agree to 1e-5, all to 1e-2, and the predictions."""
    transformed, _ = api.binarize(MODELS / "cnn.onnx", skip=["first_conv"], weight_bits=2, activation_bits=3,
                                  stage="transform")
    emulated, report = api.binarize(MODELS / "cnn.onnx", skip=["first_conv"], weight_bits=2, activation_bits=3,
                                    emulate=True)
    assert not any(n.domain for n in emulated.graph.node)
    import onnxruntime

    data = dict(np.load(MODELS / "cnn_test.npz"))
    plain = onnxruntime.InferenceSession(emulated.SerializeToString(), providers=["CPUExecutionProvider"])
    got = plain.run(None, {"input": data["input"][:64]})[0]
    want = api.run(transformed, {"input": data["input"][:64]})["logits"]
    diff, scale = np.abs(got - want), np.abs(want).max()
    assert np.median(diff) <= 1e-5 * scale and diff.max() <= 1e-2 * scale
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.98


def _conv_bn_model() -> onnx.ModelProto:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits, nodes, x = [], [], "x"
    for i, (cin, cout) in enumerate([(8, 16), (16, 16)]):
        params = {f"w{i}": rng.normal(size=(cout, cin, 3, 3)), f"s{i}": rng.uniform(0.5, 2, cout),
                  f"b{i}": rng.normal(size=cout), f"m{i}": rng.normal(size=cout), f"v{i}": rng.uniform(0.5, 2, cout)}
        inits += [numpy_helper.from_array(v.astype(np.float32), k) for k, v in params.items()]
        nodes += [helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                  helper.make_node("BatchNormalization", [f"c{i}", f"s{i}", f"b{i}", f"m{i}", f"v{i}"], [f"n{i}"],
                                   name=f"bn{i}")]
        x = f"n{i}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, 10, 10])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [2, 16, 10, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.slow  # the default run's only multi-bit kernel compile (14 s cold); the slow tests run the kernel
def test_batchnorm_folds_into_multibit_layers():
    """A BatchNormalization after a lowered 2x2-bit conv is folded into its level scales and bias; outputs as with
    --keep-batchnorm up to float32 rounding."""
    from onnxopt import runtime
    from onnxopt.measure.feeds import random_feeds

    source = _conv_bn_model()
    kept, _ = api.binarize(source, weight_bits=2, activation_bits=2, keep_batchnorm=True)
    folded, report = api.binarize(source, weight_bits=2, activation_bits=2)
    bn = lambda m: sum(n.op_type == "BatchNormalization" for n in m.graph.node)  # noqa: E731
    assert bn(kept) == 2 and bn(folded) == 0
    feeds = random_feeds(source, 2)
    a, b = runtime.run(kept, feeds), runtime.run(folded, feeds)
    for name in a:
        assert np.abs(a[name] - b[name]).max() <= 1e-4 * np.abs(a[name]).max()
