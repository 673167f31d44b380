"""Random check inputs (measure/feeds.py): integer inputs that index a table stay within it."""
import numpy as np

from onnxopt.measure.feeds import random_feeds, table_rows

TEXT = """
<ir_version: 8, opset_import: ["" : 13]>
g (int64[N, 5] ids, int64[N, 5] mask, int64[N, 5] other) => (float[N, 5, 4] y, float[N, 5, 4] z, int64[N, 5] m) {
    y = Gather <axis = 0> (emb, ids)
    z = Gather <axis = 0> (table, other)
    m = Identity (mask)
}
"""


def _model():
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.parser.parse_model(TEXT)
    model.graph.initializer.append(numpy_helper.from_array(np.zeros((7, 4), np.float32), "emb"))
    # 'table' comes from a node, not an initializer: its size is not read, so 'other' gets ones (declined case)
    model.graph.node.insert(0, helper.make_node("ConstantOfShape", ["shape"], ["table"]))
    model.graph.initializer.append(numpy_helper.from_array(np.array([3, 4], np.int64), "shape"))
    onnx.checker.check_model(model)
    return model


def test_token_ids_are_random_rows_of_the_embedding_and_masks_ones():
    """Random ids were all ones (one token repeated: MiniLM's check saw one sentence shape); they are drawn from
    the vocabulary the consuming Gather reads now."""
    model = _model()
    assert table_rows(model) == {"ids": 7}
    feeds = random_feeds(model, 64)
    ids = feeds["ids"]
    assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() < 7 and len(np.unique(ids)) == 7
    assert (feeds["mask"] == 1).all() and (feeds["other"] == 1).all()


def test_a_user_value_for_an_integer_input(tmp_path):
    """`--input-value NAME=V` sets an input of the random check inputs (silero's sample rate `sr`, a mask of
    zeros); an unknown name or a fraction for an integer input is a usage error, before any rewrite."""
    import pytest
    from conftest import run_cli

    from onnxopt.errors import UsageError

    feeds = random_feeds(_model(), 4, values={"other": 3, "mask": 0})
    assert (feeds["other"] == 3).all() and (feeds["mask"] == 0).all() and feeds["other"].dtype == np.int64
    with pytest.raises(UsageError, match="no input of that name"):
        random_feeds(_model(), 4, values={"sr": 16000})
    with pytest.raises(UsageError, match="give a whole number"):
        random_feeds(_model(), 4, values={"mask": 0.5})
    import onnx

    path = tmp_path / "m.onnx"
    onnx.save(_model(), str(path))
    code, _, err = run_cli("quantize", path, "--check", "2", "--input-value", "rate=1", "-o", tmp_path / "o.onnx")
    assert code == 2 and err.strip().endswith("(inputs: ids, mask, other)"), err
    code, _, err = run_cli("quantize", path, "--check", "2", "--input-value", "sr", "-o", tmp_path / "o.onnx")
    assert code == 2 and "expected NAME=V" in err, err
