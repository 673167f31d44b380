"""factor on convolutions: every mode exact at full rank over conv geometries, accuracy under a budget, what is
declined and why."""
import os

import numpy as np
import onnx
import pytest
from conftest import MODELS, accuracy, load_split, ort_run, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt.passes.factor.conv import tucker2

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))


def conv_model(c, o, kh, kw, *, strides=(1, 1), dilations=(1, 1), pads=(0, 0, 0, 0), auto_pad=None, bias=True,
               group=1, size=(9, 11), seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((o, c // group, kh, kw)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w")]
    inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(o).astype(np.float32), "b"))
        inputs.append("b")
    attrs = {"kernel_shape": [kh, kw], "strides": list(strides), "dilations": list(dilations), "group": group}
    if auto_pad:
        attrs["auto_pad"] = auto_pad
    else:
        attrs["pads"] = list(pads)
    node = helper.make_node("Conv", inputs, ["y"], name="conv", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, c, *size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _full_rank(mode, c, o, kh, kw):
    if mode == "tucker":
        return {"rank_for": [f"conv={c}x{o}"]}
    return {"rank": "1.0"}


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(mode=st.sampled_from(["channel", "tucker", "spatial"]), c=st.integers(2, 6), o=st.integers(2, 7),
       kh=st.sampled_from([1, 2, 3, 5]), kw=st.sampled_from([1, 3, 4]), sh=st.integers(1, 3), sw=st.integers(1, 2),
       dh=st.integers(1, 2), dw=st.integers(1, 2), pads=st.tuples(*[st.integers(0, 2)] * 4),
       auto_pad=st.sampled_from([None, None, "SAME_UPPER", "SAME_LOWER", "VALID"]), bias=st.booleans())
def test_full_rank_reproduces_the_conv_in_every_mode(mode, c, o, kh, kw, sh, sw, dh, dw, pads, auto_pad, bias):
    """Tolerance 1e-4 of the output range: the factors are float32 roundings of float64 SVD/HOOI results."""
    if mode == "spatial" and (auto_pad or kh * kw == 1):
        return  # declined with a reason: tested below
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        dh = dw = 1  # onnxruntime's Conv refuses dilations with SAME padding
    model = conv_model(c, o, kh, kw, strides=(sh, sw), dilations=(dh, dw), pads=pads, auto_pad=auto_pad, bias=bias)
    new, report = onnxopt.factor(model, conv_mode=mode, allow_growth=True, **_full_rank(mode, c, o, kh, kw))
    assert report.changed and report.changed[0].action == f"factored ({mode})"
    onnx.checker.check_model(new)
    x = {"x": np.random.default_rng(1).standard_normal((2, c, 9, 11)).astype(np.float32)}
    (want,), (got,) = ort_run(model, x), ort_run(new, x)
    assert got.shape == want.shape
    assert np.max(np.abs(got - want)) <= 1e-4 * max(np.max(np.abs(want)), 1e-6)


def test_tucker2_hooi_is_no_worse_than_hosvd(rng):
    w = rng.standard_normal((24, 16, 3, 3))
    errors = [tucker2(w, 6, 8, sweeps=s)[3] for s in (0, 1, 5)]
    assert errors[2] <= errors[1] + 1e-12 <= errors[0] + 1e-12


@pytest.mark.parametrize("group,reason", [(2, "grouped/depthwise"), (4, "grouped/depthwise")])
def test_grouped_and_depthwise_convs_are_left_alone_with_the_reason(group, reason):
    model = conv_model(4, 4, 3, 3, group=group)
    _, report = onnxopt.factor(model, rank="0.5")
    assert not report.changed and reason in report.layers[0].reason


def test_spatial_mode_declines_auto_pad_and_1x1():
    for kwargs in ({"kh": 3, "kw": 3, "auto_pad": "SAME_UPPER"}, {"kh": 1, "kw": 1}):
        k = {x: kwargs.pop(x) for x in ("kh", "kw")}
        _, report = onnxopt.factor(conv_model(4, 8, k["kh"], k["kw"], **kwargs), rank="0.5", conv_mode="spatial")
        assert not report.changed and "spatial mode needs" in report.layers[0].reason


def test_auto_picks_per_layer_and_says_which():
    _, report = onnxopt.factor(MODELS / "cnn.onnx", rank="0.3", skip=["fc"])
    modes = {x.name: x.action for x in report.changed}
    assert all(a in ("factored (channel)", "factored (tucker)", "factored (spatial)") for a in modes.values())
    assert len(modes) == 3


@pytest.mark.parametrize("fraction,calibrated,floor", [(0.2, False, 0.96), (0.2, True, 0.96), (0.5, True, 0.965)])
def test_cnn_convs_under_a_budget_keep_accuracy(fraction, calibrated, floor):
    """The reference figure (a 40-line channel-mode script on a similar CNN): 20% of conv params → 0.959 plain,
    0.961 whitened, float 0.969. Held-out digits; calibration on the 256-digit training split."""
    kwargs = {"calibration": MODELS / "cnn_calib.npz"} if calibrated else {}
    model, report = onnxopt.factor(MODELS / "cnn.onnx", budget=f"params={fraction}", skip=["fc"], **kwargs)
    x, y = load_split("cnn", "test")
    got = accuracy(model, x, y)
    print(f"\ncnn convs at params={fraction} (calibrated: {calibrated}): {got:.4f} (float 0.9710), "
          f"{report.budget['used']:,} of {report.budget['dense']:,} params")
    assert got >= floor and report.budget["used"] <= report.budget["allowed"]


def test_flops_budget_counts_output_pixels():
    _, report = onnxopt.factor(MODELS / "cnn.onnx", budget="flops=0.5", skip=["fc"])
    dense = {x["name"]: x["before"] for x in report.budget["layers"]}
    assert dense["/conv2/Conv"] == 2 * 64 * 64 * 9 * 14 * 14 + 0  # 14x14 output pixels after the first pool


def test_inspect_says_which_convs_can_be_factored():
    model = conv_model(4, 4, 3, 3, group=4)
    rows = onnxopt.inspect(model)["layers"]
    assert rows[0]["factor"].startswith("no: grouped/depthwise")
    rows = onnxopt.inspect(MODELS / "cnn.onnx")["layers"]
    assert {r["name"]: r["factor"] for r in rows}["/conv2/Conv"] == "yes: channel/tucker/spatial"


def test_bad_tucker_ranks_and_mode_are_usage_errors(tmp_path):
    for argv in (["--rank-for", "conv2=4x"], ["--rank-for", "conv2=0x3"], ["--rank", "0.5", "--conv-mode", "cp"]):
        code, _, err = run_cli("factor", MODELS / "cnn.onnx", *argv, "-o", tmp_path / "x.onnx")
        assert code == 2 and err.count("onnxopt: error:") == 1, err


@pytest.mark.parametrize("strides,dilations,pads", [((1,), (1,), (2, 2)), ((2,), (3,), (0, 4)), ((3,), (1,), (1, 0))])
def test_conv1d_is_factored_in_channel_mode(strides, dilations, pads, tmp_path):
    """Audio models (silero-vad) are Conv1d stacks: before, "only 2-D convs are factored". Full rank reproduces
    the conv (float32 rounding: 1e-4 relative); rank 0.5 with calibration whitens by the 1-D patches' Gram and
    beats plain SVD on those inputs' outputs."""
    rng = np.random.default_rng(1)
    c, o, k, length = 16, 24, 5, 64
    # inputs with strong channel correlation, so the whitened factorization has something to win
    mix = rng.standard_normal((c, 3)).astype(np.float32)
    x = np.einsum("cr,nrl->ncl", mix, rng.standard_normal((32, 3, length)).astype(np.float32))
    x += 0.05 * rng.standard_normal(x.shape).astype(np.float32)
    w = rng.standard_normal((o, c, k)).astype(np.float32)
    conv = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[k], strides=list(strides),
                            dilations=list(dilations), pads=list(pads))
    graph = helper.make_graph([conv], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", c, length])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", o, "l"])],
                              [numpy_helper.from_array(w, "w"),
                               numpy_helper.from_array(rng.standard_normal(o).astype(np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    want = ort_run(model, {"x": x})[0]
    full, report = onnxopt.factor(model, rank="1.0", allow_growth=True)
    assert report.changed[0].action == "factored (channel)"
    got = ort_run(full, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    np.savez(tmp_path / "calib.npz", x=x[:16])
    plain = ort_run(onnxopt.factor(model, rank="0.25")[0], {"x": x[16:]})[0]
    whitened = ort_run(onnxopt.factor(model, rank="0.25", calibration=tmp_path / "calib.npz")[0], {"x": x[16:]})[0]
    err = lambda y: float(np.linalg.norm(y - want[16:]) / np.linalg.norm(want[16:]))  # noqa: E731
    assert err(whitened) < 0.7 * err(plain), (err(whitened), err(plain))  # measured 0.41 vs 0.72
    onnx.save(model, str(tmp_path / "m.onnx"))
    code, out, _ = run_cli("factor", tmp_path / "m.onnx", "--rank", "0.5", "--conv-mode", "tucker", "-o",
                           tmp_path / "t.onnx")
    assert "1-D conv: --conv-mode tucker needs two spatial axes" in out, (code, out, _)
