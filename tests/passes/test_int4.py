"""quantize --weight-bits 4: MatMul weights in 4-bit blocks through onnxruntime's MatMulNBits quantizer."""
import numpy as np
import onnx
import pytest
from conftest import MODELS, accuracy, load_split, run_cli

import onnxopt
from onnxopt.graph.constants import constants_as_initializers


@pytest.mark.parametrize("algorithm", ["rtn", pytest.param("hqq", marks=pytest.mark.slow)])  # hqq: 2 s of torch
def test_token_mlp_4bit_keeps_accuracy_at_under_a_third_of_the_file(algorithm, tmp_path):
    """Held-out test split (never used here to choose anything). Measured: file 27.8%, 0.934 -> 0.933 (rtn)."""
    if algorithm == "hqq":
        pytest.importorskip("torch")  # onnxruntime's HQQ runs in torch (the [train] extra)
    out = tmp_path / "q4.onnx"
    model, report = onnxopt.quantize(MODELS / "token_mlp.onnx", weight_bits=4, algorithm=algorithm, output=out)
    assert out.stat().st_size < 0.32 * (MODELS / "token_mlp.onnx").stat().st_size  # 27.8% (the Gemm stays)
    assert sum(n.op_type == "MatMulNBits" and n.domain == "com.microsoft" for n in model.graph.node) == 3
    source = onnx.load(str(MODELS / "token_mlp.onnx"))
    opsets = {o.domain: o.version for o in model.opset_import}
    assert opsets.pop("com.microsoft") == 1 and opsets == {o.domain: o.version for o in source.opset_import}
    assert model.ir_version == source.ir_version
    onnx.checker.check_model(model)
    x, y = load_split("cnn", "test")
    float_acc, q4_acc = accuracy(constants_as_initializers(source), x, y), accuracy(model, x, y)
    assert q4_acc >= float_acc - 0.01, (float_acc, q4_acc)
    assert {x.name for x in report.changed} == {"/embed/MatMul", "/up/MatMul", "/down/MatMul"}


def test_4bit_selection_and_gate(tmp_path):
    model, report = onnxopt.quantize(MODELS / "token_mlp.onnx", weight_bits=4, skip=["/up/MatMul"])
    assert sum(n.op_type == "MatMulNBits" for n in model.graph.node) == 2
    # a gate of no loss at all keeps layers float, the most costly first, until it passes, and says why
    model, report = onnxopt.quantize(MODELS / "token_mlp.onnx", weight_bits=4, max_drop=0.0,
                                     data=MODELS / "cnn_test.npz")
    assert report.changed == [] or all("kept float" in x.reason for x in report.layers if x.action == "skipped")


@pytest.mark.parametrize("args,message", [
    (["--weight-bits", "3"], "invalid --weight-bits 3: choose 8 or 4"),
    (["--weight-bits", "4", "--block-size", "48"], "invalid --block-size 48: a power of two from 16 to 256"),
    (["--weight-bits", "4", "--algorithm", "gptq"], "invalid --algorithm 'gptq'"),
    (["--weight-bits", "4", "--per-channel"], "--weight-bits 4 is weight-only"),
])
def test_bad_4bit_options_are_usage_errors(args, message, tmp_path):
    code, _, err = run_cli("quantize", MODELS / "token_mlp.onnx", *args, "-o", tmp_path / "o.onnx")
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o.onnx").exists()


def test_4bit_output_matches_a_numpy_dequantization(tmp_path):
    """Independent reference: the MatMulNBits weight unpacked by hand (4-bit codes, per-block scale and zero point,
    onnxruntime's documented layout) reproduces what the session computes, to float32 rounding (1e-4)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    k, n = 64, 24
    w = rng.standard_normal((k, n)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    q4, _ = onnxopt.quantize(model, weight_bits=4, block_size=32)
    node = next(x for x in q4.graph.node if x.op_type == "MatMulNBits")
    inits = {t.name: numpy_helper.to_array(t) for t in q4.graph.initializer}
    codes, scales = inits[node.input[1]], inits[node.input[2]].reshape(n, -1)
    zeros = inits[node.input[3]].reshape(n, -1) if len(node.input) > 3 and node.input[3] else None
    low, high = codes & 0x0F, codes >> 4  # (n, blocks, 16 bytes): two codes a byte, low nibble first
    values = np.stack([low, high], -1).reshape(n, -1, 32).astype(np.float32)
    zp = 8.0 if zeros is None else np.stack([zeros & 0x0F, zeros >> 4], -1).reshape(n, -1)[:, :values.shape[1]]
    dequant = ((values - (zp[..., None] if zeros is not None else zp)) * scales[..., None]).reshape(n, -1)[:, :k].T
    x = rng.standard_normal((5, k)).astype(np.float32)
    got = onnxopt.session(q4).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ dequant, rtol=1e-4, atol=1e-4 * float(np.abs(got).max()))
    assert np.abs(dequant - w).max() < 0.25 * np.abs(w).max()  # and it is w, at 4 bits


def _embedding_model(ir_version: int):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["emb", "ids"], ["h"], name="embed", axis=0),
         helper.make_node("MatMul", ["h", "w"], ["y"], name="proj")], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 32])],
        [numpy_helper.from_array(rng.standard_normal((100, 64)).astype(np.float32), "emb"),
         numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=ir_version)


def test_embedding_tables_are_4bit_where_the_ir_allows():
    """Token embeddings (half of MiniLM's weights) were no candidate of any command. A Gather's table is quantized
    to 4 bits in blocks along each row (GatherBlockQuantized), keeping the input's opsets and IR version (the
    quantizer raised the default opset to 21); before IR 10 (no uint4 tensors) it is declined with that reason."""
    model = _embedding_model(10)
    out, report = onnxopt.quantize(model, weight_bits=4)
    kinds = {n.op_type for n in out.graph.node}
    assert {"GatherBlockQuantized", "MatMulNBits"} <= kinds and "Gather" not in kinds
    assert {(o.domain, o.version) for o in out.opset_import} == {("", 17), ("com.microsoft", 1)}
    assert out.ir_version == 10
    # the gathered rows themselves (the MatMul left float): each value within half a 4-bit step of its block of
    # 32 along the row, (max - min) / 15 / 2, the bound of round-to-nearest with a zero point; wrong rows, a
    # wrong block axis or a table left float would miss it (float32 rounding: 1e-5)
    only_rows, _ = onnxopt.quantize(model, weight_bits=4, only=["embed"])
    table = onnx.numpy_helper.to_array(model.graph.initializer[0])
    ids = np.random.default_rng(1).integers(0, 100, (3, 5))
    sess = onnxopt.session(_with_output(only_rows, "h"))
    got = sess.run(["h"], {"ids": ids})[0]
    blocks = table.reshape(100, 2, 32)
    half_step = ((blocks.max(-1) - blocks.min(-1)) / 15 / 2)[ids]  # [3, 5, 2]
    err = np.abs(got - table[ids]).reshape(3, 5, 2, 32)
    assert (err <= half_step[..., None] + 1e-5).all() and err.max() > 0
    rows = {x.name: x for x in report.layers}
    assert rows["embed"].action == "quantized" and rows["embed"].bytes_after < rows["embed"].bytes_before / 5
    old, report = onnxopt.quantize(_embedding_model(8), weight_bits=4)
    assert "Gather" in {n.op_type for n in old.graph.node} and old.ir_version == 8
    assert "needs IR 10" in {x.name: x for x in report.layers}["embed"].reason


def _with_output(model, name):
    from onnx import TensorProto, helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return model
