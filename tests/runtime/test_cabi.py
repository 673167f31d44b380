"""The C ABI path for lowered BitConv (runtime/cabi.py, ortshim.c): the same bits as the PyOp bridge, bad inputs
refused with an onnxruntime error instead of a crash, and the fallback."""
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import conv_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_cases import CHANNELS, conv_cases

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
@given(c=CHANNELS, o=st.integers(1, 70), data=st.data(), n=st.integers(1, 3), one_d=st.booleans(),
       bits=st.tuples(st.integers(1, 3), st.integers(1, 3)), seed=st.integers(0, 2**31))
def test_c_path_equals_pyop_bit_for_bit(library, c, o, data, n, one_d, bits, seed):
    """Lowered layers (BitConv, and MultibitBitConv for Kw x Ka other than 1x1) over random geometries (Conv1d
    too, kernels up to 130 taps along an axis), batch > 1 with samples at different scales: the C path and the
    PyOp bridge run the same kernels on the same data, so the outputs are identical, not close."""
    rng = np.random.default_rng(seed)
    case = data.draw(conv_cases(spatial=1 if one_d else 2, max_k=3, max_pad=2))
    w = rng.standard_normal((o, c, *case.kernel))
    x = rng.standard_normal((n, c, *case.sizes))
    attrs = case.attributes()
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


def _far_padded(pads, strides):
    w = np.ones((1, 8, 1, 1), np.float32)
    model = conv_model(w, strides=strides, pads=[pads] * 4)
    return onnxopt.convert_to_native_binary_convolution(onnxopt.convert_to_binary_convolution(model))


def test_geometry_far_beyond_the_input_is_refused(library):
    """Stride 4096 and pads 65536 on a 1x1 input ask the kernel for 156 GiB: the allocation failed inside the
    kernel and session.run returned an unwritten buffer with success. Now the C path, the PyOp bridge and the
    guarded session each refuse it before any allocation."""
    lowered = _far_padded(65536, [4096, 4096])
    x = np.ones((1, 8, 1, 1), np.float32)
    with pytest.raises(Exception, match="would exceed 2 GiB"):
        _session(lowered, library).run(None, {"X": x})
    # a raw session on the PyOp bridge cannot raise (an exception there aborts the process): an empty output
    # and a line on stderr; onnxopt's own session raises on it
    (out,) = _session(lowered, pyop.register()).run(None, {"X": x})
    assert out.size == 0
    with pytest.raises(onnxopt.OnnxoptError, match=r"would take 156\.0 GiB .*limit 2 GiB"):
        onnxopt.session(lowered).run(None, {"X": x})


def test_a_pyop_failure_is_an_error_of_onnxopt_sessions(monkeypatch):
    """Whatever fails inside a PyOp body (here: its input check raising) makes onnxopt's session.run raise,
    where a raw session gets an empty output."""
    from onnxopt.graph import schemas

    transformed = onnxopt.convert_to_binary_convolution(conv_model(np.ones((4, 8, 3, 3), np.float32)))
    sess = onnxopt.session(transformed)  # BinaryConv: the PyOp bridge

    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(schemas, "constants_problem", broken)
    with pytest.raises(onnxopt.OnnxoptError, match="the kernel failed: BinaryConv: RuntimeError: boom"):
        sess.run(None, {"X": np.ones((1, 8, 7, 5), np.float32)})


OOM_SCRIPT = """
import resource, sys
import numpy as np, onnx, onnxruntime as ort
from onnxopt.runtime import cabi
so = ort.SessionOptions()
so.register_custom_ops_library(cabi.library_path(("BitConv",)))
sess = ort.InferenceSession(sys.argv[1], so)
vm = int(next(line for line in open("/proc/self/status") if line.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (600 << 20), resource.RLIM_INFINITY))
try:
    sess.run(None, {"X": np.ones((1, 8, 1, 1), np.float32)})
except Exception as exc:
    print("raised:", exc)
else:
    print("returned")
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="address-space limit via /proc and RLIMIT_AS")
def test_a_failed_allocation_in_the_kernel_is_an_error(library, tmp_path):
    """A 1.8 GB work buffer (under the bound) in a process limited to 600 MB more address space: the kernel's
    allocation fails, and session.run raises instead of returning the unwritten output as a success."""
    onnx.save(_far_padded(7500, [16, 16]), tmp_path / "far.onnx")
    result = subprocess.run([sys.executable, "-c", OOM_SCRIPT, str(tmp_path / "far.onnx")], capture_output=True,
                            text=True, timeout=300)
    assert "raised:" in result.stdout and "the kernel failed" in result.stdout, result.stdout + result.stderr[-2000:]


def test_work_bound_formulas_agree():
    """The graph-side bound (kernels/geometry.py, no numba) and the kernel's own (kernels/bitconv.py) agree."""
    from onnxopt.kernels import bitconv, simd
    from onnxopt.kernels.geometry import TILE_PIXELS, Geometry, work_bytes

    assert TILE_PIXELS == simd.LANES
    for pads, strides, shape, kernel in ((0, 1, (2, 65, 30, 31), (3, 3)), (7, 3, (1, 3, 5, 70), (1, 9)),
                                         (65536, 4096, (1, 8, 1, 1), (1, 1))):
        g = Geometry.from_conv({"pads": [pads] * 4, "strides": [strides] * 2}, 2, shape[1])
        n, c, h, w = shape
        assert work_bytes(shape, kernel, g) == bitconv.work_bytes(n, h, w, c, *kernel, g.encode())


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


PLANTED = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(getenv("PLANTED_MARK"), "w");
    if (f) { fputs("ran as the victim", f); fclose(f); }
}
"""


def _plant(folder, tmp_path):
    """A library with a constructor, under the name the cache would look up."""
    import shutil

    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    digest = __import__("hashlib").sha256(cabi.SOURCE.read_bytes() + compiler.encode()).hexdigest()[:16]
    (tmp_path / "planted.c").write_text(PLANTED)
    target = folder / f"ortshim-{digest}.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(target), str(tmp_path / "planted.c")], check=True)
    return target


@pytest.mark.slow
@pytest.mark.parametrize("setup", ["world_writable", "other_owner", "no_record"])
def test_a_planted_library_in_the_cache_never_runs(library, tmp_path, setup):
    """The C shim was loaded from the cache whenever a file of the predictable name was there: another local user
    who could write the cache folder ran code in the victim's process. Now the folder (and those above it) must
    be the user's and not writable by others, and the file must match the digest recorded when it was built."""
    folder = tmp_path / "cache"
    folder.mkdir(mode=0o700)
    target = _plant(folder, tmp_path)
    if setup == "world_writable":
        folder.chmod(0o777)
    elif setup == "other_owner":
        if os.geteuid() != 0:
            pytest.skip("needs root to give the folder to another user")
        os.chown(folder, 65534, 65534)
        os.chown(target, 65534, 65534)
    mark = tmp_path / "mark"
    env = {**os.environ, "ONNXOPT_CACHE_DIR": str(folder), "PLANTED_MARK": str(mark)}
    code = "from onnxopt.runtime import cabi; print(cabi.path())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert not mark.exists(), "the planted library ran"
    assert out.stdout.startswith("C ABI"), out.stdout + out.stderr  # our own build still serves
    if setup != "no_record":
        assert "not using the kernel cache" in out.stderr and "writable by" in out.stderr, out.stderr
    else:
        assert f"C ABI ({target})" in out.stdout  # rebuilt in place: the recorded digest is ours now


def test_the_contention_governor_changes_threads_not_bits(library):
    """ortshim.c runs the kernels on the calling thread alone while another process takes a core (its contention
    governor; benchmarks/cpu_hog.py measures the effect): forced serial, a lowered model's outputs are the same
    bits as with all of numba's threads. The governor was handed numba's set_num_threads."""
    import ctypes
    import time

    from llvmlite import binding

    assert binding.address_of_symbol("set_num_threads")  # what cabi hands over; None would leave the governor idle
    rng = np.random.default_rng(3)
    model = conv_model(rng.standard_normal((96, 64, 3, 3)).astype(np.float32), pads=[1, 1, 1, 1])
    lowered, _ = api.binarize(model)
    feeds = {"X": rng.standard_normal((4, 64, 28, 28)).astype(np.float32)}
    sess = _session(lowered, library)
    serial_until = ctypes.c_int64.in_dll(cabi._state["library"], "onnxopt_serial_until")
    saved = serial_until.value
    try:
        serial_until.value = 0
        (parallel,) = sess.run(None, feeds)
        serial_until.value = int(time.monotonic()) + 3600
        (serial,) = sess.run(None, feeds)
    finally:
        serial_until.value = saved
    assert np.array_equal(parallel, serial)
