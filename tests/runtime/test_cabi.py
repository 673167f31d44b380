"""The C ABI path for lowered BitConv (runtime/cabi.py, ortshim.c): the same bits as the PyOp bridge, bad inputs
refused with an onnxruntime error instead of a crash, and the fallback."""
import os
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from conftest import conv_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import onnxopt
from onnxopt import api, runtime
from onnxopt.runtime import cabi, pyop


def _session(model, library):
    so = ort.SessionOptions()
    so.register_custom_ops_library(library)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def library():
    found = cabi.library_path()
    if found is None:
        pytest.skip(f"the C path is off here: {cabi.path()}")
    return found


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
@given(c=st.integers(1, 140), o=st.integers(1, 70), k=st.integers(1, 3), stride=st.integers(1, 2),
       pad=st.integers(0, 2), dilation=st.integers(1, 2), n=st.integers(1, 3), h=st.integers(5, 12),
       one_d=st.booleans(), bits=st.tuples(st.integers(1, 3), st.integers(1, 3)), seed=st.integers(0, 2**31))
def test_c_path_equals_pyop_bit_for_bit(library, c, o, k, stride, pad, dilation, n, h, one_d, bits, seed):
    """Lowered layers (BitConv, and MultibitBitConv for Kw x Ka other than 1x1) over random geometries (Conv1d
    too), batch > 1 with samples at different scales: the C path and the PyOp bridge run the same kernels on the
    same data, so the outputs are identical, not close."""
    rng = np.random.default_rng(seed)
    spatial = 1 if one_d else 2
    w = rng.standard_normal((o, c) + (k,) * spatial)
    x = rng.standard_normal((n, c, 2 * h) if one_d else (n, c, h, h))
    attrs = dict(pads=[pad] * 2 * spatial, strides=[stride] * spatial, dilations=[dilation] * spatial)
    x *= rng.uniform(0.1, 10, (n,) + (1,) * (x.ndim - 1))  # samples at very different scales
    model = conv_model(w.astype(np.float32), rng.standard_normal(o).astype(np.float32), **attrs)
    lowered, _ = api.binarize(model, weight_bits=bits[0], activation_bits=bits[1])
    assert {n.op_type for n in lowered.graph.node} == {"BitConv" if bits == (1, 1) else "MultibitBitConv"}
    assert runtime.custom_op_library(lowered) == library
    feeds = {"X": x.astype(np.float32)}
    (fast,) = _session(lowered, library).run(None, feeds)
    (slow,) = _session(lowered, pyop.register()).run(None, feeds)
    assert fast.shape == slow.shape and np.array_equal(fast, slow)


def test_bad_input_is_an_error_not_a_crash(library):
    """A raw session (no onnxopt guard in front) fed the wrong channel count or a too-small image: onnxruntime
    raises with the kernel's reason, and the process goes on."""
    lowered = onnxopt.binarize_convolution(conv_model(np.ones((4, 8, 3, 3), np.float32)))
    lowered.graph.input[0].type.tensor_type.ClearField("shape")  # so that onnxruntime lets any input through
    sess = _session(lowered, library)
    for x, text in ((np.ones((1, 7, 6, 6), np.float32), "input channels do not match"),
                    (np.ones((1, 8, 2, 2), np.float32), "smaller than the kernel's span"),
                    (np.ones((1, 8, 6), np.float32), "input rank")):
        with pytest.raises(Exception, match=text):
            sess.run(None, {"X": x})
    assert sess.run(None, {"X": np.ones((1, 8, 6, 6), np.float32)})[0].shape == (1, 4, 4, 4)


@pytest.mark.slow
def test_other_custom_ops_and_the_switch_use_pyop(library):
    transformed = onnxopt.convert_to_binary_convolution(conv_model(np.ones((4, 8, 3, 3), np.float32)))
    assert runtime.custom_op_library(transformed) == pyop.register()  # BinaryConv has no C path
    assert runtime.custom_op_library(None) == pyop.register()  # user code without a model: every op
    code = "from onnxopt.runtime import cabi; print(cabi.path())"
    for env, word in (({"ONNXOPT_KERNEL_PATH": "pyop"}, "PyOp bridge"), ({}, "C ABI")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                             env={**os.environ, **env})
        assert out.returncode == 0 and out.stdout.startswith(word), out.stderr


def test_version_says_which_path(library):
    from conftest import cli

    r = cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("onnxopt ") and f"C ABI ({library})" in r.stdout, r.stderr
