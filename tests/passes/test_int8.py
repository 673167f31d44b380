"""int8 of embedding tables: a Gather's float table becomes int8 (onnxruntime's GatherQuant / QDQ Gather)."""
import numpy as np
import onnx
import pytest
from test_int4 import _embedding_model, _with_output

import onnxopt


def _table_error(model, out):
    """(max |gathered row - float row|, the int8 step of the table), on random ids."""
    table = onnx.numpy_helper.to_array(model.graph.initializer[0])
    ids = np.random.default_rng(1).integers(0, 100, (3, 5))
    got = onnxopt.session(_with_output(out, "h")).run(["h"], {"ids": ids})[0]
    scales = [onnx.numpy_helper.to_array(t) for t in out.graph.initializer if t.name.endswith("_scale")]
    return np.abs(got - table[ids]).max(), float(np.max(scales[0]))


def test_embedding_tables_are_int8_dynamic_and_static():
    """The token embedding (half of MiniLM's weights) stayed float under int8: the file kept 65%. Now the table
    is an int8 initializer and every gathered value is within half an int8 step of the float row (rounding to
    nearest; 1e-6 for float32 arithmetic); a table left float, or the wrong rows, would miss the size or bound."""
    model = _embedding_model(8)
    float_bytes = model.ByteSize()
    for calibration in (None, {"ids": np.random.default_rng(2).integers(0, 100, (16, 5))}):
        kwargs = {} if calibration is None else {"calibration": calibration}
        out, report = onnxopt.quantize(model, only=["embed"], **kwargs)
        rows = {x.name: x for x in report.layers}
        assert rows["embed"].action == "quantized", rows["embed"].reason
        assert rows["embed"].bytes_after * 4 == rows["embed"].bytes_before
        tables = [t for t in out.graph.initializer if t.dims == [100, 64]]
        assert [t.data_type for t in tables] in ([onnx.TensorProto.INT8], [onnx.TensorProto.UINT8])
        assert out.ByteSize() < 0.5 * float_bytes
        err, step = _table_error(model, out)
        assert 0 < err <= step / 2 + 1e-6, (err, step)
        assert out.ir_version == 8 and {(o.domain, o.version) for o in out.opset_import} == {("", 17)}


def _if_model():
    """An If whose branches each multiply by a weight defined outside the branch (as silero-vad's exports do):
    onnxruntime's own subgraph mode fails there ("Expected W to be an initializer")."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def branch(name):
        return helper.make_graph([helper.make_node("MatMul", ["x", f"w_{name}"], [f"y_{name}"], name=f"mm_{name}")],
                                 name, [], [helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT, None)])

    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="sum"),
         helper.make_node("Greater", ["s", "zero"], ["c"], name="positive"),
         helper.make_node("If", ["c"], ["y"], name="if", then_branch=branch("then"), else_branch=branch("else"))],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])],
        [numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w_then"),
         numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w_else"),
         numpy_helper.from_array(np.array(0, np.float32), "zero")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("weight_bits", [8, 4])
def test_layers_in_if_branches_reading_outer_weights_are_quantized(weight_bits):
    """quantize and quantize --weight-bits 4 listed no layer of silero-vad (its convs are in If branches, their
    weights outside): each branch is now quantized as a model of its own. Both branches' layers change, the
    outer float weights are gone, and each branch's output stays within 5% (int8, dynamic activations) or 15%
    (4-bit, blocks of 32) of the float output's largest value: a wrong weight or branch misses that by far."""
    model = _if_model()
    out, report = onnxopt.quantize(model, weight_bits=weight_bits)
    assert sorted(x.name for x in report.changed) == ["if/else_branch/mm_else", "if/then_branch/mm_then"]
    assert not {"w_then", "w_else"} & {t.name for t in out.graph.initializer}
    assert out.ByteSize() < model.ByteSize() / (3 if weight_bits == 8 else 4.5)
    x = np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32)
    for sign in (1, -1):  # each branch
        feed = {"x": sign * np.abs(x)}
        want = onnxopt.session(model).run(None, feed)[0]
        got = onnxopt.session(out).run(None, feed)[0]
        assert np.abs(got - want).max() < (0.05 if weight_bits == 8 else 0.15) * np.abs(want).max()


def test_static_int8_names_the_body_layers_it_leaves_float():
    model = _if_model()
    calibration = {"x": np.random.default_rng(2).standard_normal((16, 64)).astype(np.float32)}
    out, report = onnxopt.quantize(model, calibration=calibration)
    rows = {x.name: x for x in report.layers}
    assert rows["if/then_branch/mm_then"].action == "skipped"
    assert "does not reach If/Loop/Scan bodies" in rows["if/then_branch/mm_then"].reason


def test_budget_and_prune_see_the_layers_in_if_branches():
    """factor --budget kept every If-branch layer dense (they were outside its allocation: silero-vad's file
    stayed at 99%); prune listed no row for them. The budget now allocates over the branches' layers (ids
    `<If>/<branch>/<layer>`) and factors them within it; prune names each and says why it stays whole."""
    model = _if_model()
    out, report = onnxopt.factor(model, budget="params=0.5")
    allocated = {row["name"] for row in report.budget["layers"]}
    assert allocated == {"if/then_branch/mm_then", "if/else_branch/mm_else"}
    assert {x.name for x in report.changed} == allocated
    assert report.budget["used"] <= report.budget["allowed"] and out.ByteSize() < 0.6 * model.ByteSize()
    _, report = onnxopt.prune(model, keep=0.5)
    assert {x.name: x.reason for x in report.layers}["if/then_branch/mm_then"].startswith(
        "inside a control-flow body")
