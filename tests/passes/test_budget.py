"""factor --budget: the allocation honours the budget, beats uniform ranks, composes with --skip/--rank-for,
searches with --max-drop; and the --max-drop gate itself."""
import json

import numpy as np
import onnx
import pytest
from conftest import MODELS, accuracy, load_split, run_cli

import onnxopt
from onnxopt.graph.constants import constants_as_initializers
from onnxopt.passes.factor import budget
from onnxopt.passes.factor import dense as factor
from onnxopt.passes.factor.options import FactorOptions
from onnxopt.pipeline.options import SelectOptions

TOKEN_MODELS = {"token_mlp": "cnn", "tiny_vit": "cnn", "mlp": "mlp"}  # model: whose data splits it reads


def _params(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def _layers(path, **select):
    model = onnx.load(str(path))
    return budget.collect(model, factor.rules(FactorOptions(rank="0.5")), SelectOptions(**select).selection())[0]


@pytest.mark.parametrize("name", list(TOKEN_MODELS))
@pytest.mark.parametrize("kind", ["params", "flops"])
def test_budget_is_honoured_to_within_one_rank_step(name, kind):
    path = MODELS / f"{name}.onnx"
    layers = _layers(path)
    for fraction in (0.05, 0.2, 0.3, 0.5, 0.8):
        if fraction < budget.smallest_fraction(layers, kind):
            continue
        model, report = onnxopt.factor(path, budget=f"{kind}={fraction}")
        b = report.budget
        assert b["used"] <= b["allowed"] == int(fraction * b["dense"])
        steps = [(x.m + x.n) * (1 if kind == "params" else 2 * x.rows) for x in layers
                 if b["layers"][layers.index(x)]["rank"] not in (None, x.max_rank)]
        assert not steps or b["allowed"] - b["used"] < min(steps), (fraction, b["allowed"] - b["used"], steps)
        if kind == "params":  # independent of the report: the weights the output model really holds
            # (the input's Constant tensors count as they are written out: initializers)
            source = constants_as_initializers(onnx.load(str(path)))
            assert _params(model) - _params(source) == b["used"] - b["dense"]
        ranks = {x["name"]: x["rank"] for x in b["layers"]}
        factored = {x.name: x.rank for x in report.changed}
        assert factored == {k: v for k, v in ranks.items() if v is not None}
        onnx.checker.check_model(model)


def test_flops_count_the_tokens_of_a_matmul_on_3d_input():
    _, report = onnxopt.factor(MODELS / "token_mlp.onnx", budget="flops=0.5")
    dense = {x["name"]: x["before"] for x in report.budget["layers"]}
    assert dense["/up/MatMul"] == 2 * 16 * 128 * 512  # 16 patches per image
    assert dense["/out/Gemm"] == 2 * 2048 * 10


def test_allocation_never_loses_to_a_uniform_rank_on_its_own_objective(rng):
    """Random layers with spectra decaying at different speeds: at the cost of every uniform rank, the
    allocation's summed loss is at most the uniform one's."""
    layers = []
    for i, (m, n, decay) in enumerate([(40, 30, 0.5), (64, 16, 0.05), (30, 50, 0.2), (20, 20, 1.0)]):
        s = np.exp(-decay * np.arange(min(m, n))) * rng.uniform(0.5, 5)
        w = rng.standard_normal((m, min(m, n))) @ np.diag(s) @ rng.standard_normal((min(m, n), n))
        spectrum = onnxopt.passes.factor.linalg.spectrum(w)
        layers.append(budget.Layer(f"l{i}", m, n, bias=0, rows=1, tail=spectrum.tail_energy()))
    dense = sum(x.cost("params", None) for x in layers)
    for r in np.linspace(0.05, 1.0, 20):
        uniform = {x.name: (k if (k := max(1, round(r * min(x.m, x.n)))) <= x.max_rank else None) for x in layers}
        cost = sum(x.cost("params", uniform[x.name]) for x in layers)
        allocation = budget.allocate(layers, "params", cost / dense + 1e-12)
        assert allocation.used <= cost
        assert (sum(x.loss(allocation.ranks[x.name]) for x in layers)
                <= sum(x.loss(uniform[x.name]) for x in layers) + 1e-9)


def _best_uniform_accuracy(path, fraction, x, y, **kwargs):
    layers = _layers(path)
    dense = sum(layer.cost("params", None) for layer in layers)

    def cost(r):
        ks = [max(1, round(r * min(x.m, x.n))) for x in layers]
        return sum(x.cost("params", k if k <= x.max_rank else None) for x, k in zip(layers, ks))

    r = max(r for r in np.arange(1, 101) / 100 if cost(r) <= fraction * dense)
    return accuracy(onnxopt.factor(path, rank=f"{r:.2f}", **kwargs)[0], x, y)


@pytest.mark.parametrize("name,fraction,calibrated,floor", [
    ("mlp", 0.2, True, 0.92),  # float 0.927; best uniform 0.149
    ("token_mlp", 0.3, False, 0.92),  # float 0.934; best uniform 0.372
    ("tiny_vit", 0.3, True, 0.87),  # float 0.915; best uniform 0.444
])
def test_budgeted_accuracy_on_held_out_digits(name, fraction, calibrated, floor):
    path = MODELS / f"{name}.onnx"
    x, y = load_split(TOKEN_MODELS[name], "test")
    kwargs = {"calibration": MODELS / f"{TOKEN_MODELS[name]}_calib.npz"} if calibrated else {}
    model, _ = onnxopt.factor(path, budget=f"params={fraction}", **kwargs)
    got = accuracy(model, x, y)
    uniform = _best_uniform_accuracy(path, fraction, x, y, **kwargs)
    print(f"\n{name} at params={fraction} (calibrated: {calibrated}): budgeted {got:.4f}, best uniform {uniform:.4f}")
    assert got >= floor and got > uniform + 0.3


def test_skipped_layers_are_outside_the_budget_and_pinned_ranks_are_kept():
    path = MODELS / "mlp.onnx"
    _, report = onnxopt.factor(path, budget="params=0.3", skip=["out"], rank_for=["l2=20"])
    rows = {x["name"]: x for x in report.budget["layers"]}
    assert set(rows) == {"/l1/Gemm", "/l2/Gemm"}
    assert rows["/l2/Gemm"]["rank"] == 20 and rows["/l2/Gemm"]["pinned"]
    assert report.budget["dense"] == 784 * 400 + 400 + 400 * 200 + 200
    assert report.budget["used"] <= report.budget["allowed"]
    assert {x.name: x.rank for x in report.changed}["/l2/Gemm"] == 20


def test_search_finds_the_smallest_passing_budget(tmp_path):
    path, data = MODELS / "mlp.onnx", MODELS / "mlp_train.npz"  # search data: not the held-out split
    code, out, err = run_cli("factor", path, "--budget", "params=auto", "--max-drop", "0.01", "--data", data,
                             "--json", "-o", tmp_path / "m.onnx")
    assert code == 0, err
    report = json.loads(out)
    search = report["budget"]["search"]
    passed = [c["fraction"] for c in search if c["passed"]]
    assert 3 <= len(search) <= 8 and passed
    assert report["budget"]["fraction"] == min(passed)
    assert all(c["fraction"] < min(passed) for c in search if not c["passed"])  # the bisection brackets it
    assert report["check"]["score"]["drop"] <= 0.01
    assert report["budget"]["used"] < 0.5 * report["budget"]["dense"]
    x, y = load_split("mlp", "test")
    print(f"\nsearched budget {min(passed):.3f}: held-out accuracy "
          f"{accuracy(str(tmp_path / 'm.onnx'), x, y):.4f} (float 0.9270)")


def test_text_report_shows_the_allocation_and_the_totals(tmp_path):
    code, out, err = run_cli("factor", MODELS / "mlp.onnx", "--budget", "params=0.3", "-o", tmp_path / "m.onnx")
    assert code == 0, err
    assert "budgeted layer" in out and "normalised error" in out
    assert "budget params=0.3:" in out and "params allowed" in out
    api = onnxopt.factor(MODELS / "mlp.onnx", budget="params=0.3")[1].budget
    assert f"{api['used']:,} of {api['allowed']:,}" in out


def test_max_drop_gate_refuses_and_writes_nothing(tmp_path):
    out = tmp_path / "m.onnx"
    code, stdout, err = run_cli("factor", MODELS / "mlp.onnx", "--rank", "1", "--data", MODELS / "mlp_test.npz",
                                "--max-drop", "0.01", "-o", out)
    assert code == 1 and not out.exists()
    (line,) = [x for x in err.splitlines() if x.startswith("onnxopt: error:")]
    assert "accuracy drops by" in line and "more than --max-drop 0.01" in line
    assert "accuracy on 1000 samples: 0.9270 ->" in stdout


def test_max_drop_without_labels_scores_agreement(tmp_path):
    data = tmp_path / "inputs.npz"
    x, _ = load_split("mlp", "test")
    np.savez(data, input=x)
    _, report = onnxopt.factor(MODELS / "mlp.onnx", rank="0.5", data=data, max_drop=0.2)
    assert report.check["score"]["metric"] == "top-1 agreement"
    assert report.check["score"]["reference"] == 1.0


def test_missing_label_key_is_one_clear_line(tmp_path):
    code, _, err = run_cli("factor", MODELS / "mlp.onnx", "--rank", "0.5", "--data", MODELS / "mlp_test.npz",
                           "--labels", "nope", "--max-drop", "0.1", "-o", tmp_path / "m.onnx")
    assert code == 1 and "no array 'nope' for --labels" in err and not (tmp_path / "m.onnx").exists()


def test_transformer_export_under_a_flops_budget(tmp_path):
    """tiny_vit: two pre-norm transformer blocks from torch's dynamo exporter (IR 10, opset 20)."""
    source = onnx.load(str(MODELS / "tiny_vit.onnx"))
    out = tmp_path / "vit.onnx"
    model, report = onnxopt.factor(MODELS / "tiny_vit.onnx", budget="flops=0.5", output=out,
                                   calibration=MODELS / "cnn_calib.npz", data=MODELS / "cnn_test.npz")
    onnx.checker.check_model(onnx.load(str(out)))
    assert model.ir_version == source.ir_version and list(model.opset_import) == list(source.opset_import)
    assert report.budget["used"] <= report.budget["allowed"]
    assert len(report.changed) >= 6
    x, y = load_split("cnn", "test")
    (a,), (b,) = onnxopt.runtime.run(source, {"input": x}).values(), onnxopt.runtime.run(model, {"input": x}).values()
    agreement = float((a.argmax(1) == b.argmax(1)).mean())
    print(f"\ntiny_vit at flops=0.5: top-1 agreement {agreement:.4f}, accuracy {report.check['score']}")
    assert agreement >= 0.95
