"""BitConv layers chained in packed bits (kernels/chain.py, runtime/chains.py): the same outputs as the unchained
layers, bit for bit; only the links the rewrite can reproduce are chained; bad inputs to the chain ops are
onnxruntime errors, not crashes."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_cases import CHANNELS, conv_cases
from onnx import helper, numpy_helper

from onnxopt import api, runtime
from onnxopt.graph import schemas as ops
from onnxopt.graph.constants import Constants
from onnxopt.kernels import bitconv, chain, packing
from onnxopt.kernels.geometry import Geometry
from onnxopt.runtime import chains, native


def _maxpool(y, pool):
    """ONNX MaxPool (floor mode) in numpy: the independent reference for the OR-pooled signs."""
    kh, kw, sh, sw, dh, dw, top, left, bottom, right = (int(v) for v in pool)
    n, c, h, w = y.shape
    padded = np.full((n, c, h + top + bottom, w + left + right), -np.inf, np.float32)
    padded[:, :, top:top + h, left:left + w] = y
    oh, ow = chain.pooled_shape(h, w, np.asarray(pool))
    out = np.full((n, c, oh, ow), -np.inf, np.float32)
    for a in range(kh):
        for b in range(kw):
            rows = slice(a * dh, a * dh + (oh - 1) * sh + 1, sh)
            out = np.maximum(out, padded[:, :, rows, b * dw:b * dw + (ow - 1) * sw + 1:sw])
    return out


pools = st.one_of(st.just(chain.NO_POOL), st.builds(
    lambda k, s, d, p: np.array([k[0], k[1], s[0], s[1], d[0], d[1], *p], np.int64),
    st.tuples(st.integers(1, 3), st.integers(1, 3)), st.tuples(st.integers(1, 2), st.integers(1, 2)),
    st.tuples(st.integers(1, 2), st.integers(1, 2)), st.tuples(*[st.integers(0, 1)] * 4)))


@pytest.mark.slow
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), c=CHANNELS, o=st.integers(1, 70), o2=st.integers(1, 9),
       case=conv_cases(max_k=3, max_pad=1, max_dilation=1), n=st.integers(1, 3), pool=pools)
def test_chained_kernels_equal_the_float_layers(seed, c, o, o2, case, n, pool):
    """PackSigns → PackedBitConvSigns → (OR-pool) → PackedBitConv vs BitConv → Relu → MaxPool (numpy) → BitConv:
    equal, not close (the signs come from the same float32 arithmetic as the float output). First-layer kernels
    up to 130 taps along an axis."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, *case.sizes)).astype(np.float32)
    g1 = case.geometry(c).encode()
    g2 = Geometry.from_conv({"pads": [1, 0, 1, 1]}, 2, o).encode()
    w1, w2 = rng.standard_normal((o, c, *case.kernel)), rng.standard_normal((o2, o, 3, 3))
    wp1, wp2 = packing.pack_weights(w1.astype(np.float32)), packing.pack_weights(w2.astype(np.float32))
    a1, b1 = rng.random(o).astype(np.float32), rng.standard_normal(o).astype(np.float32)
    a2, b2 = rng.random(o2).astype(np.float32), rng.standard_normal(o2).astype(np.float32)
    y1 = bitconv.bit_conv(x, wp1, a1, b1, g1)
    if min(chain.pooled_shape(y1.shape[2], y1.shape[3], pool)) < 2:
        return  # the pool leaves nothing for the 3x3 second layer
    want = bitconv.bit_conv(_maxpool(np.maximum(y1, 0), pool), wp2, a2, b2, g2)
    signs = chain.packed_conv(chain.pack_signs(x), chain.NO_POOL, wp1, a1, b1, g1, emit_signs=True)
    assert np.array_equal(signs, chain.pack_signs(y1))
    assert np.array_equal(chain.packed_conv(signs, pool, wp2, a2, b2, g2, emit_signs=False), want)


def _block_model(widths, pool_attrs, size=12, seed=0, extra_output=False):
    """Conv → Relu → [MaxPool] per width: the first conv stays float (--skip first_conv)."""
    rng = np.random.default_rng(seed)
    nodes, inits, x, c = [], [], "input", 3
    for i, width in enumerate(widths):
        name = "first_conv" if i == 0 else f"conv{i}"
        inits += [numpy_helper.from_array((rng.standard_normal((width, c, 3, 3)) / 3).astype(np.float32), f"{name}.w"),
                  numpy_helper.from_array(rng.standard_normal(width).astype(np.float32) * 0.1, f"{name}.b")]
        nodes += [helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [f"{name}.y"], name=name, pads=[1] * 4),
                  helper.make_node("Relu", [f"{name}.y"], [f"{name}.r"], name=f"{name}.relu")]
        x, c = f"{name}.r", width
        if pool_attrs is not None and i in (1, 2):
            nodes.append(helper.make_node("MaxPool", [x], [f"{name}.p"], name=f"{name}.pool", **pool_attrs))
            x = f"{name}.p"
    outputs = [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None)]
    if extra_output:
        outputs.append(helper.make_tensor_value_info("conv2.y", onnx.TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "blocks", [helper.make_tensor_value_info("input", 1, ["N", 3, size, size])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _needs_c_path():
    if native.library_path() is None:
        pytest.skip(f"no native library here: {native.path()}")


@pytest.mark.parametrize("pool_attrs", [None, dict(kernel_shape=[2, 2], strides=[2, 2]),
                                        dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
                                        dict(kernel_shape=[2, 3], strides=[1, 2], dilations=[2, 1])])
def test_sessions_chain_the_links_and_keep_the_outputs(pool_attrs):
    _needs_c_path()
    model = _block_model([8, 70, 16, 5], pool_attrs)
    lowered, _ = api.binarize(model, skip=["first_conv"])
    linked = chains.chained(lowered)
    types = [n.op_type for n in linked.graph.node]
    assert types.count(ops.PACK_SIGNS) == 1 and types.count(ops.PACKED_BIT_CONV_SIGNS) == 2
    assert types.count(ops.PACKED_BIT_CONV) == 1 and "BitConv" not in types and types.count("Relu") == 2
    assert types.count("MaxPool") == 0 and runtime.custom_op_library(linked) == native.library_path()
    x = np.random.default_rng(1).standard_normal((3, 3, 12, 12)).astype(np.float32) * [[[[0.1]]], [[[1]]], [[[9]]]]
    x = x.astype(np.float32)
    (chained,) = runtime.session(lowered).run(None, {"input": x})
    (plain,) = runtime.session(lowered, chain=False).run(None, {"input": x})
    assert np.array_equal(chained, plain)


def test_links_it_cannot_reproduce_stay_float():
    model = _block_model([8, 16, 16, 8], dict(kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1))
    lowered, _ = api.binarize(model, skip=["first_conv"])
    assert not chains.find_links(lowered.graph, Constants(lowered.graph))  # ceil mode: the windows differ
    read_twice = _block_model([8, 16, 16, 8], None, extra_output=True)  # conv2's output is a graph output too
    lowered, _ = api.binarize(read_twice, skip=["first_conv"])
    links = chains.find_links(lowered.graph, Constants(lowered.graph))
    assert [(link.producer.name, link.consumer.name) for link in links] == [("conv1", "conv2")]  # conv2.y: an output


def test_bad_input_to_a_chain_op_is_an_error_not_a_crash():
    """A raw session on the chained graph, fed an image the pool leaves nothing of: onnxruntime raises with the
    kernel's reason, and the process goes on."""
    _needs_c_path()
    lowered, _ = api.binarize(_block_model([8, 16, 16, 8], dict(kernel_shape=[2, 2], strides=[2, 2])),
                              skip=["first_conv"])
    linked = chains.chained(lowered)
    linked.graph.input[0].type.tensor_type.ClearField("shape")
    sess = ort.InferenceSession(linked.SerializeToString(), runtime.session_options(model=linked),
                                providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="smaller than the kernel's span"):
        sess.run(None, {"input": np.ones((1, 3, 2, 2), np.float32)})
    assert sess.run(None, {"input": np.ones((2, 3, 12, 12), np.float32)})[0].shape == (2, 8, 3, 3)
