"""--finetune and `onnxopt finetune`: distillation from the input model (recover/distill.py, recover/torch_graph.py).

Accuracy is measured on models/*_test.npz, held out: fine-tuning reads the first 2,000 images of *_train.npz,
with the labels removed."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import MODELS, ROOT, cli, sha256

torch = pytest.importorskip("torch")

from onnxopt import api, runtime  # noqa: E402
from onnxopt.errors import OnnxoptError  # noqa: E402
from onnxopt.measure.feeds import random_feeds  # noqa: E402
from onnxopt.recover.torch_graph import GraphModule, SignSTE, trainable_initializers  # noqa: E402

DATA = ROOT / "tests" / "data"


@pytest.fixture(scope="module")
def unlabeled(tmp_path_factory):
    """The first 2,000 training images of each sample model, without labels."""
    folder = tmp_path_factory.mktemp("finetune")
    paths = {}
    for name in ("cnn", "mlp"):
        with np.load(MODELS / f"{name}_train.npz") as d:
            paths[name] = folder / f"{name}_2k.npz"
            np.savez(paths[name], input=d["input"][:2000])
    return paths


def _binarized(path):
    return api.binarize(path, stage="transform", skip=["first_conv"])[0]


TORCH_CASES = [MODELS / "cnn.onnx", MODELS / "mlp.onnx", MODELS / "token_mlp.onnx", MODELS / "tiny_vit.onnx",
               *sorted(DATA.glob("*.onnx")), "binarized cnn", "factored cnn", "multi-bit cnn"]


@pytest.mark.parametrize("case", TORCH_CASES, ids=lambda c: getattr(c, "name", c))
def test_torch_graph_computes_what_onnxruntime_computes(case):
    """The student's forward in torch against onnxruntime (the independent reference), on random inputs: within
    1e-5 of the output's largest magnitude (float32 summation order differs between the two; a wrong op is off by
    far more)."""
    if case == "binarized cnn":
        model = _binarized(MODELS / "cnn.onnx")
    elif case == "multi-bit cnn":
        model = api.binarize(MODELS / "cnn.onnx", stage="transform", skip=["first_conv"], weight_bits=2,
                             activation_bits=3)[0]
    elif case == "factored cnn":
        model = api.factor(MODELS / "cnn.onnx", rank="0.5", conv_mode="tucker")[0]
    else:
        model = onnx.load(case)
    feeds = random_feeds(model, 1)
    expected = runtime.run(model, feeds, optimize=False)
    module = GraphModule(model, trainable_initializers(model))
    with torch.no_grad():
        got = module({k: torch.from_numpy(v) for k, v in feeds.items()})
    for (name, want), have in zip(expected.items(), got):
        assert have.shape == want.shape, name
        assert np.abs(have.numpy() - want).max() <= 1e-5 * np.abs(want).max(), name


def test_sign_ste_is_the_clipped_identity():
    v = torch.tensor([-2.0, -1.0, -0.3, 0.0, 0.5, 1.0, 1.5], requires_grad=True)
    y = SignSTE.apply(v)
    y.sum().backward()
    assert y.tolist() == [-1, -1, -1, -1, 1, 1, 1]  # b(0) = -1, as netopt
    assert v.grad.tolist() == [0, 1, 1, 1, 1, 1, 0]


def test_only_weights_train():
    """BatchNormalization statistics, shapes and scalars stay constant; conv kernels, linear weights, BN scale and
    shift, BinaryConv's latent weight, α and bias train."""
    legacy_bn = onnx.load(DATA / "mobilenet_v2_tiny_legacy.onnx")
    names = set(trainable_initializers(legacy_bn))
    for node in legacy_bn.graph.node:
        if node.op_type == "BatchNormalization":
            assert not {node.input[3], node.input[4]} & names and {node.input[1], node.input[2]} <= names
    binary = _binarized(MODELS / "cnn.onnx")
    conv = next(n for n in binary.graph.node if n.op_type == "BinaryConv")
    trained = set(trainable_initializers(binary))
    assert set(conv.input[1:4]) <= trained and conv.input[4] not in trained


@pytest.mark.slow
def test_binarized_cnn_recovers_without_labels(unlabeled, tmp_path):
    """Issue 12's target: all convs but the first binarized, 2,000 unlabeled images, >= 0.95 held out (float
    0.971; binarized without recovery 0.56, refit 0.63)."""
    out = tmp_path / "cnn_bin.onnx"
    model, report = api.binarize(MODELS / "cnn.onnx", skip=["first_conv"], finetune=unlabeled["cnn"],
                                 data=MODELS / "cnn_test.npz", output=out)
    score = report.check["score"]
    assert score["metric"] == "accuracy" and score["candidate"] >= 0.95, score
    assert report.finetune["loss_after"] < report.finetune["loss_before"] / 10 and not report.finetune["labels"]
    assert [n.op_type for n in model.graph.node].count("BitConv") == 2  # lowered after training
    saved = onnx.load(out)
    onnx.checker.check_model(saved)
    assert saved.ir_version == onnx.load(MODELS / "cnn.onnx").ir_version


def test_factored_mlp_recovers(unlabeled):
    """The MLP factored to 5% of its dense params: >= 0.91 held out after fine-tuning with the defaults (float
    0.927, budget allocation alone 0.877, measured 0.925 in 2 s; 5 epochs at the default lr 0.005 give 0.888, at
    lr 0.001 >= 0.91: short runs want a lower rate, docs/recovery.md)."""
    _, plain = api.factor(MODELS / "mlp.onnx", budget="params=0.05", data=MODELS / "mlp_test.npz")
    _, tuned = api.factor(MODELS / "mlp.onnx", budget="params=0.05", data=MODELS / "mlp_test.npz",
                          finetune=unlabeled["mlp"])
    assert plain.check["score"]["candidate"] < 0.89
    assert tuned.check["score"]["candidate"] >= 0.91


def test_labels_add_cross_entropy(tmp_path):
    data = tmp_path / "labelled.npz"
    with np.load(MODELS / "mlp_train.npz") as d:
        np.savez(data, input=d["input"][:256], y=d["label"][:256])
    _, report = api.factor(MODELS / "mlp.onnx", rank="0.1", finetune=data, labels="y", epochs=1)
    assert report.finetune["labels"] and "cross-entropy" in report.finetune["loss"]


@pytest.mark.slow
def test_runs_are_deterministic_and_staged_equals_one_shot(tmp_path, unlabeled):
    """binarize --finetune in one command, and binarize --stage transform + finetune + lower, give the same bits."""
    options = dict(epochs=1, batch_size=128)
    one_shot, _ = api.binarize(MODELS / "cnn.onnx", skip=["first_conv"], finetune=unlabeled["cnn"], **options)
    again, _ = api.binarize(MODELS / "cnn.onnx", skip=["first_conv"], finetune=unlabeled["cnn"], **options)
    transformed = tmp_path / "t.onnx"
    api.binarize(MODELS / "cnn.onnx", skip=["first_conv"], stage="transform", output=transformed)
    digest = sha256(transformed)
    tuned, report = api.finetune(MODELS / "cnn.onnx", transformed, unlabeled["cnn"], output=tmp_path / "f.onnx",
                                 **options)
    assert sha256(transformed) == digest and report.output
    staged, _ = api.lower(tmp_path / "f.onnx")
    for a, b, c in zip(one_shot.graph.initializer, again.graph.initializer, staged.graph.initializer):
        assert a.name == b.name == c.name
        assert np.array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
        assert np.array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(c))


@pytest.mark.parametrize("name", ["resnet18_tiny_legacy", "resnet18_tiny_dynamo", "mobilenet_v2_tiny_legacy",
                                  "mobilenet_v2_tiny_dynamo", "yolo_tiny_legacy"])
@pytest.mark.parametrize("command", ["binarize", "factor"])
def test_exported_networks_finetune_end_to_end(tmp_path, name, command):
    """Mechanics on torchvision-style exports (random weights): one epoch on four random images, then the lowered
    output is valid, loads and runs, and keeps the input's IR version and opsets."""
    source = onnx.load(DATA / f"{name}.onnx")
    data = tmp_path / "x.npz"
    np.savez(data, **random_feeds(source, 4))
    out = tmp_path / "out.onnx"
    first_conv = {"resnet18": "conv1", "mobilenet": "features.0", "yolo": "stem.0"}[name.split("_")[0]]
    kwargs = {"skip": [first_conv]} if command == "binarize" else {"rank": "0.5"}
    model, report = getattr(api, command)(source, finetune=data, epochs=1, batch_size=2, output=out, **kwargs)
    assert report.changed and report.finetune["steps"] >= 1 and report.finetune["history"][-1]["loss"] >= 0
    saved = onnx.load(out)
    onnx.checker.check_model(saved)
    assert saved.ir_version == source.ir_version
    assert {o.domain: o.version for o in source.opset_import}.items() <= \
        {o.domain: o.version for o in saved.opset_import}.items()
    outputs = runtime.run(out, {"input": np.load(data)["input"][:1]})
    assert all(np.isfinite(v).all() for v in outputs.values())


def test_bitconv_is_refused_with_a_hint(tmp_path, unlabeled):
    lowered = api.binarize(MODELS / "cnn.onnx", skip=["first_conv"])[0]
    with pytest.raises(OnnxoptError, match=r"cannot fine-tune through com\.onnxopt::BitConv .*--stage transform"):
        api.finetune(MODELS / "cnn.onnx", lowered, unlabeled["cnn"])


@pytest.mark.slow
@pytest.mark.parametrize("args, code, text", [
    (["--finetune", "{mlp}"], 1, "input 'input'"),  # MLP images (784) into the CNN (1x28x28)
    (["--finetune", "{cnn}", "--epochs", "0"], 2, "invalid --epochs 0"),
    (["--finetune", "{cnn}", "--labels", "nope"], 1, "no array 'nope' for --labels"),
    (["--finetune", "{cnn}", "--lr", "-1"], 2, "invalid --lr -1"),
    (["--epochs", "3"], 2, "--epochs needs --finetune"),
    (["--finetune", "missing.npz"], 2, "no such --finetune data file"),
])
def test_bad_input_is_one_line_and_nothing_written(tmp_path, unlabeled, args, code, text):
    out = tmp_path / "out.onnx"
    args = [a.format(**{k: str(v) for k, v in unlabeled.items()}) for a in args]
    r = cli("binarize", MODELS / "cnn.onnx", "--skip", "first_conv", *args, "-o", out)
    assert r.returncode == code and text in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not out.exists()


def test_without_torch_says_how_to_install(tmp_path, unlabeled):
    """torch blocked from importing: one line naming the extra, exit 1, nothing written."""
    out = tmp_path / "out.onnx"
    code = ("import sys; sys.modules['torch'] = None; from onnxopt.cli import main; "
            f"main(['binarize', {str(MODELS / 'cnn.onnx')!r}, '--finetune', {str(unlabeled['cnn'])!r}, "
            f"'-o', {str(out)!r}])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "needs torch" in r.stderr and "onnxopt[train]" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.slow
def test_finetune_command_line(tmp_path, unlabeled):
    transformed = tmp_path / "t.onnx"
    r = cli("binarize", MODELS / "cnn.onnx", "--skip", "first_conv", "--stage", "transform", "-o", transformed)
    assert r.returncode == 0, r.stderr
    before = sha256(transformed)
    out = tmp_path / "tuned.onnx"
    r = cli("finetune", MODELS / "cnn.onnx", transformed, "--data", unlabeled["cnn"], "--epochs", "1", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "finetune: KL(T=2) + layer-wise normalized MSE on 1800 samples (200 held out)" in r.stdout
    assert sha256(transformed) == before
    r = cli("finetune", MODELS / "cnn.onnx", transformed, "--data", unlabeled["cnn"], "-o", transformed, "--force")
    assert r.returncode == 2 and "is the input model" in r.stderr and sha256(transformed) == before
    assert "finetune" not in r.stdout  # refused before training, not after


@pytest.mark.slow
def test_prune_then_finetune_then_binarize(tmp_path, unlabeled):
    """A pruned model fine-tunes like any other, and stays an ordinary model for binarize."""
    out = tmp_path / "pruned.onnx"
    _, plain = api.prune(MODELS / "cnn.onnx", keep=0.25, data=MODELS / "cnn_test.npz")
    _, tuned = api.prune(MODELS / "cnn.onnx", keep=0.25, finetune=unlabeled["cnn"], epochs=2,
                         data=MODELS / "cnn_test.npz", output=out)
    assert tuned.check["score"]["candidate"] > plain.check["score"]["candidate"] + 0.03
    model, report = api.binarize(out, skip=["first_conv"])
    assert [n.op_type for n in model.graph.node].count("BitConv") == 2


@pytest.mark.slow
def test_multibit_finetune(unlabeled):
    """2x2 bits, 3 epochs on 2,000 unlabeled images: 0.947 held out (no recovery 0.935)."""
    _, report = api.binarize(MODELS / "cnn.onnx", skip=["first_conv"], weight_bits=2, activation_bits=2,
                             finetune=unlabeled["cnn"], data=MODELS / "cnn_test.npz")
    assert report.check["score"]["candidate"] >= 0.94
    assert report.finetune["loss_after"] < report.finetune["loss_before"]


# ---- layer-wise distillation and the step schedule (issue 31) ----------------------------------------------

def test_matched_tensors_are_the_changed_layers_outputs():
    """A rewrite keeps the replaced tensor's name: factor's layers are matched by their outputs; after prune the
    pruned layer's output (fewer channels) is dropped at the first batch and its consumer's is matched."""
    from onnxopt.recover.distill import matched_tensors

    mlp = onnx.load(MODELS / "mlp.onnx")
    factored, report = api.factor(mlp, rank="0.3")
    outputs = {o.name for o in mlp.graph.output}
    layers = {n.output[0] for n in mlp.graph.node if n.op_type == "Gemm"}
    assert len(layers) == len(report.changed) == 3
    assert set(matched_tensors(mlp, factored)) == layers - outputs  # the last one is the output: its own loss
    cnn = onnx.load(MODELS / "cnn.onnx")
    pruned, _ = api.prune(cnn, keep=0.5, skip=["first_conv", "conv3"])  # conv2 pruned, conv3 its consumer
    data = {"input": np.load(MODELS / "cnn_calib.npz")["input"][:64]}
    _, tuned = api.prune(cnn, keep=0.5, skip=["first_conv", "conv3"], finetune=data, steps=5)
    assert 0 < tuned.finetune["matched_tensors"] < len(matched_tensors(cnn, pruned))


def test_steps_schedule_holdout_and_time_limit(unlabeled):
    """Steps, not epochs: 1000 by default whatever the data size, --epochs counts passes; a tenth of the data is
    held out and scored every 5% of the steps, the best weights are kept; --max-time stops the run."""
    data = {"input": np.load(unlabeled["mlp"])["input"][:300]}
    _, report = api.factor(MODELS / "mlp.onnx", rank="0.1", finetune=data, steps=40)
    f = report.finetune
    assert (f["train_samples"], f["held_out_samples"], f["planned_steps"]) == (270, 30, 40)
    assert [h["step"] for h in f["history"]] == [10, 20, 30, 40] and f["kept"]  # 5% of 40 steps: 10 at least
    _, report = api.factor(MODELS / "mlp.onnx", rank="0.1", finetune=data, steps=400)
    assert [h["step"] for h in report.finetune["history"]][:2] == [20, 40]
    assert f["loss_after"] == min(h["held_out"] for h in f["history"]) < f["loss_before"]
    _, report = api.factor(MODELS / "mlp.onnx", rank="0.1", finetune=data, epochs=2, batch_size=100)
    assert report.finetune["planned_steps"] == 6  # 270 training samples: 3 batches a pass
    _, report = api.factor(MODELS / "mlp.onnx", rank="0.1", finetune=data, max_time=0.01)
    assert report.finetune["steps"] < 1000 and report.finetune["stopped"].startswith("--max-time")
    with pytest.raises(Exception, match="give --steps or --epochs"):
        api.factor(MODELS / "mlp.onnx", rank="0.1", finetune=data, steps=5, epochs=1)
    with pytest.raises(Exception, match="invalid --distill"):
        api.factor(MODELS / "mlp.onnx", rank="0.1", finetune=data, distill="all")


def test_per_position_probabilities_are_distilled_by_kl():
    """A CTC recognizer's (or token classifier's) output, softmax over the last axis of (samples, positions,
    classes), is matched by KL per position (softened by T through the logarithms), not by MSE on the
    probabilities, where a position's argmax barely moves the loss. Checked against KL in numpy."""
    from onnxopt.recover.distill import _DistillationLoss, _Teacher

    rng = np.random.default_rng(0)
    t = rng.dirichlet(np.full(7, 0.3), size=(4, 5)).astype(np.float32)
    s = rng.dirichlet(np.full(7, 0.3), size=(4, 5)).astype(np.float32)
    teacher = _Teacher.__new__(_Teacher)
    teacher.first = [t, rng.normal(size=(4, 5, 7)).astype(np.float32)]
    assert teacher.output_kinds() == ["probabilities", "values"]
    loss = _DistillationLoss(["probabilities"], 2.0, 1, "outputs")
    got = float(loss([torch.from_numpy(s)], [t]))

    def soft(p):  # softmax(log p / T) along the last axis
        q = np.exp(np.log(np.maximum(p, 1e-8)) / 2)
        return q / q.sum(-1, keepdims=True)

    pt, ps = soft(t.astype(np.float64)), soft(s.astype(np.float64))
    want = (pt * (np.log(pt) - np.log(ps))).sum(-1).mean() * 4
    assert got == pytest.approx(want, rel=1e-4) and "KL(T=2)" in loss.describe()


@pytest.mark.parametrize("command, options", [("factor", {"rank": "0.1"}),
                                               ("prune", {"keep": 0.5, "skip": ["first_conv", "conv3"]})])
def test_a_teacher_too_big_to_cache_is_recomputed_with_the_same_result(monkeypatch, command, options):
    """Teacher outputs and tapped tensors over TEACHER_CACHE_BYTES are computed per batch instead of kept (a
    ResNet-18-size model's taps over thousands of images do not fit in memory): the same weights come out, also
    where prune's own changed-shape taps are dropped from the recomputed outputs."""
    from onnxopt.recover import distill

    name = "mlp" if command == "factor" else "cnn"
    data = {"input": np.load(MODELS / f"{name}_calib.npz")["input"][:96]}
    runs = []
    for limit in (distill.TEACHER_CACHE_BYTES, 0):
        monkeypatch.setattr(distill, "TEACHER_CACHE_BYTES", limit)
        model, report = getattr(api, command)(MODELS / f"{name}.onnx", **options, finetune=data, steps=20, lr=0.001,
                                              batch_size=32)
        assert report.finetune["kept"] and report.finetune["matched_tensors"] > 0
        assert report.finetune["teacher_cached"] == (limit > 0)
        runs.append({t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer})
    assert runs[0].keys() == runs[1].keys()
    for key, value in runs[0].items():
        # onnxruntime may round a sample differently in another batch (~1e-7); wrong targets move weights ~1e-3
        np.testing.assert_allclose(runs[1][key], value, rtol=0, atol=1e-4, err_msg=key)


@pytest.mark.slow
def test_token_models_recover_from_rank_0_3():
    """Issue 31's target: token-wise models factored at uniform rank 0.3, 2,000 unlabeled images, held-out
    digits, the defaults (1000 steps, layer-wise, lr 0.005, T 2): tiny_vit (two transformer blocks, dynamo export;
    float 0.915, factored 0.572) >= 0.88 (measured 0.916 / 0.917 on two machines); token_mlp (legacy export; float
    0.934, factored 0.539) reaches about 0.88, not with a margin: 0.890 on an Intel Xeon, 0.879 on an AMD Zen 4
    (0.875-0.888 there over batch 32, 2000 steps, calibration first, lr 0.003), so it is held to 0.87, which the
    old default (3 epochs on the outputs: 0.659 on a token MLP) or a broken training loop misses."""
    with np.load(MODELS / "cnn_train.npz") as d:
        data = {"input": d["input"][:2000]}
    _, vit = api.factor(MODELS / "tiny_vit.onnx", rank="0.3", data=MODELS / "cnn_test.npz", finetune=data)
    assert vit.check["score"]["candidate"] >= 0.88 and vit.finetune["matched_tensors"] > 0
    _, mlp = api.factor(MODELS / "token_mlp.onnx", rank="0.3", data=MODELS / "cnn_test.npz", finetune=data)
    assert mlp.check["score"]["candidate"] >= 0.87


@pytest.mark.slow
def test_a_diverging_run_restarts_at_a_tenth_of_the_rate():
    """A rate far too high makes the held-out loss climb from the first score: the run restarts from the starting
    weights at a tenth of the rate (at most twice), ends better than it began, and reports the rate it used."""
    with np.load(MODELS / "cnn_train.npz") as d:
        data = {"input": d["input"][:512]}
    _, report = api.factor(MODELS / "token_mlp.onnx", rank="0.3", finetune=data, steps=200, lr=0.5)
    tune = report.finetune
    assert tune["lr_backoffs"] >= 1 and tune["lr"] == pytest.approx(0.5 / 10 ** tune["lr_backoffs"])
    assert tune["kept"] and tune["loss_after"] < tune["loss_before"]
