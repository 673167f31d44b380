"""`onnxopt prune`: channel pruning with the channels followed through the graph (passes/prune/)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import MODELS, ROOT, cli, sha256
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxopt import api, runtime
from onnxopt.graph.selection import Selection
from onnxopt.measure.feeds import random_feeds
from onnxopt.passes.prune.budget import choose
from onnxopt.passes.prune.channels import ChannelGraph, find_groups
from onnxopt.passes.prune.ranking import feature_atoms

DATA = ROOT / "tests" / "data"


@pytest.mark.slow
@pytest.mark.parametrize("keep, calibration, floor", [(0.5, None, 0.96), (0.5, True, 0.96), (0.25, None, 0.80),
                                                      (0.25, True, 0.95)])
def test_cnn_accuracy(keep, calibration, floor):
    """Held-out digits (float 0.971). 25% kept: magnitude alone 0.874, with the least-squares refit 0.968 (the
    issue's reference: 0.77 / 0.957)."""
    _, report = api.prune(MODELS / "cnn.onnx", keep=keep, data=MODELS / "cnn_test.npz",
                          calibration=MODELS / "cnn_calib.npz" if calibration else None)
    assert report.check["score"]["candidate"] >= floor


@pytest.mark.slow
def test_refit_beats_magnitude_at_a_quarter():
    scores = [api.prune(MODELS / "cnn.onnx", keep=0.25, data=MODELS / "cnn_test.npz", **extra)[1]
              .check["score"]["candidate"] for extra in ({}, {"calibration": MODELS / "cnn_calib.npz"})]
    assert scores[1] > scores[0] + 0.05


@pytest.mark.parametrize("name", ["resnet18_tiny_legacy", "resnet18_tiny_dynamo", "mobilenet_v2_tiny_legacy",
                                  "mobilenet_v2_tiny_dynamo", "yolo_tiny_legacy"])
def test_exported_networks(tmp_path, name):
    """Valid, runs, >= 30% fewer FLOPs at --keep 0.5; --keep 1.0 gives the original outputs exactly."""
    source = onnx.load(DATA / f"{name}.onnx")
    out = tmp_path / "p.onnx"
    _, report = api.prune(source, keep=0.5, output=out)
    saved = onnx.load(out)
    onnx.checker.check_model(saved, full_check=True)
    assert saved.ir_version == source.ir_version and saved.opset_import == source.opset_import
    assert report.size["flops_after"] <= 0.7 * report.size["flops_before"], report.size
    feeds = random_feeds(source, 1)
    assert all(np.isfinite(v).all() for v in runtime.run(out, feeds).values())
    same, report = api.prune(source, keep=1.0)
    assert not report.changed
    for a, b in zip(runtime.run(source, feeds).values(), runtime.run(same, feeds).values()):
        assert np.array_equal(a, b)


def test_residual_layers_share_one_channel_set():
    graph = ChannelGraph(onnx.load(DATA / "resnet18_tiny_legacy.onnx"))
    tied = [sorted(layer.name for layer in g.producers) for g in find_groups(graph) if len(g.producers) > 1]
    assert any({"/layer1/layer1.0/conv2/Conv", "/layer1/layer1.1/conv2/Conv"} <= set(t) for t in tied)
    assert any("/layer2/layer2.0/downsample/downsample.0/Conv" in t and "/layer2/layer2.1/conv2/Conv" in t
               for t in tied)


# ---- property test: random graphs, pruned by magnitude, against the original with the removed channels' weights
# zeroed in every layer that reads them (removing a channel == its readers ignoring it) -------------------------
class _Builder:
    def __init__(self, rng):
        self.rng, self.nodes, self.inits, self.n = rng, [], [], 0

    def name(self, base):
        self.n += 1
        return f"{base}{self.n}"

    def const(self, array):
        t = numpy_helper.from_array(np.asarray(array, np.float32), self.name("w"))
        self.inits.append(t)
        return t.name

    def node(self, op, inputs, **attrs):
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(op), **attrs))
        return out

    def conv(self, x, cin, cout, k=3, group=1):
        w = self.rng.normal(0, 1 / np.sqrt(cin * k * k / group), (cout, cin // group, k, k))
        return self.node("Conv", [x, self.const(w), self.const(self.rng.normal(0, 0.1, cout))], pads=[k // 2] * 4,
                         group=group)

    def bn(self, x, c):
        params = [self.rng.uniform(0.5, 1.5, c), self.rng.normal(0, 0.2, c), self.rng.normal(0, 0.2, c),
                  self.rng.uniform(0.5, 1.5, c)]
        return self.node("BatchNormalization", [x, *map(self.const, params)])

    def block(self, kind, x, c, width):
        if kind == "bn_relu":
            return self.node("Relu", [self.bn(self.conv(x, c, width), width)]), width
        if kind == "residual":
            y = self.bn(self.conv(self.node("Relu", [self.conv(x, c, width)]), width, c), c)
            return self.node("Relu", [self.node("Add", [x, y])]), c
        if kind == "concat":
            return self.node("Concat", [self.conv(x, c, width), self.conv(x, c, 2)], axis=1), width + 2
        if kind == "depthwise":
            y = self.node("Clip", [self.bn(self.conv(x, c, width, k=1), width)], )
            return self.bn(self.conv(y, width, width, group=width), width), width
        if kind == "split":
            a = self.conv(x, c, 2 * width, k=1)
            pieces = [self.name("split"), self.name("split")]
            self.nodes.append(helper.make_node("Split", [a, self.const_int([width, width])], pieces, axis=1,
                                               name=self.name("Split")))
            return self.node("Concat", [pieces[0], self.conv(pieces[1], width, width)], axis=1), 2 * width
        if kind == "silu":
            y = self.conv(x, c, width)
            return self.node("Mul", [y, self.node("Sigmoid", [y])]), width
        y = self.conv(x, c, width)  # per-channel constant scale
        return self.node("Mul", [y, self.const(self.rng.uniform(0.5, 2, (1, width, 1, 1)))]), width

    def const_int(self, values):
        t = numpy_helper.from_array(np.asarray(values, np.int64), self.name("s"))
        self.inits.append(t)
        return t.name


BLOCKS = ["bn_relu", "residual", "concat", "depthwise", "split", "silu", "scale"]


def random_model(seed: int, kinds: list[str], widths: list[int]) -> onnx.ModelProto:
    b = _Builder(np.random.default_rng(seed))
    x, c = b.conv("x", 3, widths[0]), widths[0]
    for kind, width in zip(kinds, widths[1:]):
        x, c = b.block(kind, x, c, width)
    x = b.node("Flatten", [b.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])])
    y = b.node("Gemm", [x, b.const(b.rng.normal(0, 0.05, (5, c * 16))), b.const(np.zeros(5))], transB=1)
    graph = helper.make_graph(b.nodes, "random", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, [2, 5])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def zeroed_reference(model: onnx.ModelProto, keep: float) -> onnx.ModelProto:
    """The original model with each removed channel's input weights set to 0 in every layer reading it."""
    ref = onnx.ModelProto()
    ref.CopyFrom(model)
    graph = ChannelGraph(ref)
    removed = choose(graph, find_groups(graph), keep, [], Selection(), None)
    inits = {t.name: t for t in ref.graph.initializer}
    for layer in graph.layers.values():
        if layer.in_atoms is None:
            continue
        w = numpy_helper.to_array(inits[layer.weight]).copy()
        gone = [i for i, a in enumerate(feature_atoms(layer, w)) if graph.find(a) in removed]
        m = w.reshape(w.shape[0], -1) if layer.kind == "conv" else (w if layer.in_axis == 1 else w.T)
        m[:, gone] = 0
        inits[layer.weight].CopyFrom(numpy_helper.from_array(w, layer.weight))
    return ref


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), kinds=st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=4),
       widths=st.lists(st.integers(2, 8), min_size=5, max_size=5), keep=st.sampled_from([0.25, 0.5, 0.75]))
def test_pruned_equals_zeroed_reference(seed, kinds, widths, keep):
    model = random_model(seed, kinds, widths)
    pruned, report = api.prune(model, keep=keep)
    onnx.checker.check_model(pruned, full_check=True)
    feeds = {"x": np.random.default_rng(seed).normal(size=(2, 3, 8, 8)).astype(np.float32)}
    want = runtime.run(zeroed_reference(model, keep), feeds, optimize=False)
    got = runtime.run(pruned, feeds, optimize=False)
    for a, b in zip(want.values(), got.values()):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(a).max()))
    if keep < 1 and report.changed:
        assert report.totals()["params_after"] < report.totals()["params_before"]


@pytest.mark.parametrize("args, text", [
    (["--keep", "0"], "invalid --keep '0.0'"),
    (["--keep", "1.5"], "invalid --keep '1.5'"),
    (["--keep", "0.5", "--skip", "nothing_like_this"], "--skip pattern 'nothing_like_this' matches no"),
    (["--keep-for", "conv9=0.5"], "--keep-for pattern 'conv9' matches no"),
    (["--keep-for", "conv2=2"], "invalid --keep-for conv2 '2'"),
    ([], "give --keep F"),
])
def test_bad_input(tmp_path, args, text):
    out = tmp_path / "p.onnx"
    r = cli("prune", MODELS / "cnn.onnx", *args, "-o", out)
    assert r.returncode == 2 and text in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()


def test_command_line_keep_for_and_json(tmp_path):
    out = tmp_path / "p.onnx"
    digest = sha256(MODELS / "cnn.onnx")
    r = cli("prune", MODELS / "cnn.onnx", "--keep", "0.5", "--keep-for", "conv3=0.25", "--skip", "first_conv",
            "--json", "-o", out)
    assert r.returncode == 0, r.stderr
    import json

    rows = {x["name"]: x for x in json.loads(r.stdout)["layers"]}
    assert rows["/first_conv/Conv"]["action"] == "skipped"
    assert rows["/conv2/Conv"]["channels"] == "64->64 in, 64->32 out"
    assert rows["/conv3/Conv"]["channels"] == "64->32 in, 128->32 out"
    assert sha256(MODELS / "cnn.onnx") == digest


@pytest.mark.slow
@pytest.mark.parametrize("budget, calibration", [("flops=0.25", False), ("flops=0.07", True), ("params=0.25", False)])
def test_budget_is_met_and_keeps_accuracy(budget, calibration):
    """Channel counts chosen under one global budget: the prunable layers' cost is within it, and the held-out
    accuracy stays up (flops=0.07 with calibration: 0.969; --keep 0.25 at the same FLOPs: 0.968)."""
    _, report = api.prune(MODELS / "cnn.onnx", budget=budget, data=MODELS / "cnn_test.npz",
                          calibration=MODELS / "cnn_calib.npz" if calibration else None)
    b = report.budget
    assert b["used"] <= b["allowed"] and b["used"] >= 0.8 * b["allowed"]  # met, and not by pruning everything
    assert report.check["score"]["candidate"] >= 0.95
    assert "budgeted group" in report.text() and "channels kept" in report.text()


@pytest.mark.parametrize("args, text", [
    (["--keep", "0.5", "--budget", "flops=0.5"], "--keep and --budget exclude each other"),
    (["--budget", "flops=auto"], "prune --budget takes params=F or flops=F"),
    (["--budget", "params=0.0001"], "cannot be met: the smallest budget possible is params="),
    (["--budget", "weights=0.5"], "invalid --budget 'weights=0.5'"),
])
def test_bad_budget(tmp_path, args, text):
    out = tmp_path / "p.onnx"
    r = cli("prune", MODELS / "cnn.onnx", *args, "-o", out)
    assert r.returncode == 2 and text in r.stderr, r.stderr
    assert not out.exists()
