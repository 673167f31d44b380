"""factor: numerics against the original in onnxruntime, every Gemm form, declines with reasons."""
import itertools

import numpy as np
import onnx
import pytest
from conftest import accuracy, load_split, ort_run
from onnx import helper, numpy_helper

import onnxopt
from onnxopt.errors import UsageError
from onnxopt.passes.factor import linalg


def gemm_model(rng, trans_a, trans_b, alpha, beta, bias_shape, m=6, k=24, n=16, weight_as="initializer"):
    a_shape = [k, m] if trans_a else [m, k]
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    inputs = ["A", "B"]
    inits = []
    nodes = []
    if weight_as == "initializer":
        inits.append(numpy_helper.from_array(b, "B"))
    else:
        nodes.append(helper.make_node("Constant", [], ["B"], value=numpy_helper.from_array(b, "Bv")))
    if bias_shape is not None:
        inits.append(numpy_helper.from_array(rng.standard_normal(bias_shape).astype(np.float32), "C"))
        inputs.append("C")
    nodes.append(helper.make_node("Gemm", inputs, ["Y"], name="dense", transA=trans_a, transB=trans_b,
                                  alpha=alpha, beta=beta))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("A", onnx.TensorProto.FLOAT, a_shape)],
                              [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [m, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    return model, rng.standard_normal(a_shape).astype(np.float32)


def rel_err(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("trans_a,trans_b,alpha,beta,bias_shape", [
    (ta, tb, al, be, bs) for ta, tb, (al, be), bs in itertools.product(
        (0, 1), (0, 1), ((1.0, 1.0), (0.5, 2.0), (1.5, 0.0)), (None, (16,), (1, 16), (6, 1), (6, 16), ()))])
def test_full_rank_gemm_reproduces_output(rng, trans_a, trans_b, alpha, beta, bias_shape):
    model, a = gemm_model(rng, trans_a, trans_b, alpha, beta, bias_shape)
    factored, report = onnxopt.factor_with_report(model, rank="1.0", allow_growth=True)
    assert [n.op_type for n in factored.graph.node if n.op_type == "Gemm"] == []
    assert sum(n.op_type == "MatMul" for n in factored.graph.node) == 2
    onnx.checker.check_model(factored)
    (want,) = ort_run(model, {"A": a})
    (got,) = ort_run(factored, {"A": a})
    assert rel_err(got, want) <= 1e-4
    assert report.layers[0].rank == 16


def test_constant_node_weight_and_shared_weight(rng):
    model, a = gemm_model(rng, 0, 1, 1.0, 1.0, (16,), weight_as="constant")
    # a second Gemm reading the same weight, kept out of the selection: it must still see the original
    g = model.graph
    g.node.append(helper.make_node("Gemm", ["A", "B"], ["Y2"], name="other", transB=1))
    g.output.append(helper.make_tensor_value_info("Y2", onnx.TensorProto.FLOAT, [6, 16]))
    factored, report = onnxopt.factor_with_report(model, rank=1.0, allow_growth=True, only=["dense"])
    assert {x.name: x.action for x in report.layers} == {"dense": "factored", "other": "skipped"}
    want = ort_run(model, {"A": a})
    got = ort_run(factored, {"A": a})
    for w, h in zip(want, got):
        assert rel_err(h, w) <= 1e-4


def test_matmul_3d_input_and_declines(rng):
    w = rng.standard_normal((32, 24)).astype(np.float32)
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[B, 5, 32] X, float[24, 8] Wdyn) => (float[B, 5, 24] Y, float[B, 5, 8] Z) {
        Y = MatMul(X, Wc)
        Z = MatMul(Y, Wdyn)
    }"""
    model = onnx.parser.parse_model(text)
    model.graph.initializer.append(numpy_helper.from_array(w, "Wc"))
    factored, report = onnxopt.factor_with_report(model, rank=4)
    by_op = {x.name: x for x in report.layers}
    assert by_op["MatMul_0"].action == "factored" and by_op["MatMul_0"].rank == 4
    assert by_op["MatMul_1"].reason == "weight 'Wdyn' is not a constant"
    assert by_op["MatMul_0"].flops_before == 2 * 32 * 24 * 5  # 5 rows per sample
    x = rng.standard_normal((3, 5, 32)).astype(np.float32)
    feeds = {"X": x, "Wdyn": rng.standard_normal((24, 8)).astype(np.float32)}
    u = numpy_helper.to_array(next(t for t in factored.graph.initializer if t.name.endswith("factor_U")))
    v = numpy_helper.to_array(next(t for t in factored.graph.initializer if t.name.endswith("factor_V")))
    np.testing.assert_allclose(ort_run(factored, feeds)[0], x @ u @ v, rtol=1e-4, atol=1e-4)


def test_no_gain_layer_is_left_with_reason(rng):
    model, _ = gemm_model(rng, 0, 0, 1.0, 1.0, None, m=4, k=8, n=8)
    factored, report = onnxopt.factor_with_report(model, rank=6)
    assert report.layers[0].action == "skipped"
    assert "gains nothing" in report.layers[0].reason
    assert [n.op_type for n in factored.graph.node] == ["Gemm"]


def test_rank_parsing():
    assert linalg.RankSpec.parse("0.6").resolve(784, 400) == 240
    assert linalg.RankSpec.parse("32").resolve(784, 400) == 32
    assert linalg.RankSpec.parse("5000").resolve(784, 400) == 400  # never above min(m, n)
    for bad in ("0", "-1", "1.5", "abc", "0.0", ""):
        with pytest.raises(UsageError):
            linalg.RankSpec.parse(bad)


def test_energy_rank():
    s = np.array([3.0, 2.0, 1.0, 0.0])
    assert linalg.rank_for_energy(s, 0.64) == 1  # 9/14 = 0.643
    assert linalg.rank_for_energy(s, 0.9) == 2  # 13/14 = 0.93
    assert linalg.rank_for_energy(s, 1.0) == 3


def test_randomized_svd_matches_lapack_on_low_rank_matrix(rng):
    w = (rng.standard_normal((600, 40)) @ rng.standard_normal((40, 900))).astype(np.float32)
    w += 1e-3 * rng.standard_normal(w.shape).astype(np.float32)
    f = linalg.low_rank(w, 50)
    assert f.method == "randomized"
    assert f.error < 1e-3
    assert abs(linalg.relative_error(w, f.u, f.v) - f.error) < 1e-4


def test_whitened_factors_beat_plain_svd_on_the_calibration_inputs(rng):
    # inputs concentrated on a few directions: data-aware factors spend rank where the data is
    x = rng.standard_normal((2000, 64)) * np.r_[np.full(8, 10.0), np.full(56, 0.1)]
    w = rng.standard_normal((64, 48))
    plain = linalg.low_rank(w, 8)
    aware = linalg.whitened_low_rank(w, 8, x.T @ x)
    out_err = lambda f: np.linalg.norm(x @ w - x @ f.u @ f.v) / np.linalg.norm(x @ w)  # noqa: E731
    assert out_err(aware) < 0.5 * out_err(plain)
    assert abs(out_err(aware) - aware.error) < 1e-3


def test_hooks_projection_factor_filter(rng):
    model, a = gemm_model(rng, 0, 0, 1.0, 1.0, (16,), m=6, k=64, n=64)
    seen = {}

    def factor_fn(w, k):
        seen["k"] = k
        u, s, vt = np.linalg.svd(w)
        return u[:, :k] * s[:k], vt[:k]

    out = onnxopt.factor_dense(model, projection_function=lambda w: 7, factor_function=factor_fn)
    assert seen["k"] == 7
    assert any(t.dims == [64, 7] for t in out.graph.initializer)
    kept = onnxopt.factor_dense(model, projection_function=lambda w: 7, filter_function=lambda node: False)
    assert [n.op_type for n in kept.graph.node] == ["Gemm"]


def test_sample_mlp_full_rank_and_accuracy(mlp_path, capsys):
    model = onnxopt.load_model(mlp_path)
    x, y = load_split("mlp", "test")
    full, _ = onnxopt.factor_with_report(model, rank="1.0", allow_growth=True)
    (want,), (got,) = ort_run(model, {"input": x}), ort_run(full, {"input": x})
    assert rel_err(got, want) <= 1e-4
    factored, report = onnxopt.factor_with_report(model, rank="0.6")
    t = report.totals()
    assert t["params_after"] < t["params_before"]
    before, after = accuracy(model, x, y), accuracy(factored, x, y)
    with capsys.disabled():
        print(f"\nmlp accuracy on held-out split: float {before:.4f}, --rank 0.6 {after:.4f}, "
              f"params {t['params_before']:,} -> {t['params_after']:,}")
    assert before > 0.9 and after > 0.8
