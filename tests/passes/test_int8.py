"""int8 of embedding tables: a Gather's float table becomes int8 (onnxruntime's GatherQuant / QDQ Gather)."""
import numpy as np
import onnx
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
