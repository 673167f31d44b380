"""The native custom-op library (runtime/native, kernels/native): the numba kernels' outputs bit for bit on every
instruction-set variant, bad inputs refused with an onnxruntime error, onnxruntime's threads, per-node state, no
compile and no numba at serve time, and a host with no Python at all."""
import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import cli, conv_model

import onnxopt
from onnxopt import api, runtime
from onnxopt.runtime import native, pyop

HERE = Path(__file__).parent


def _session(model, library, threads=0):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.register_custom_ops_library(library)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def library():
    found = native.library_path()
    if found is None:
        pytest.skip(f"no native library here: {native.path()}")
    return found


def lowered_cases(count: int, seed: int = 0, large: bool = False):
    """(name, lowered model, feeds) over geometries that reach every branch of the kernels: 1-D and 2-D, strides
    (gathered lanes), dilations, pads and auto_pad (the padding correction), rows of at most 4 pixels (two rows a
    job), several tiles a row, more than 64 output channels (two channel groups), more than 64 input channels
    (several words), batches of samples at different scales, and 1-bit and multi-bit layers. `large` adds layers
    big enough to be split over onnxruntime's threads."""
    rng = np.random.default_rng(seed)
    for trial in range(count):
        one_d, bits = trial % 5 == 4, [(1, 1), (2, 1), (1, 2), (2, 3)][trial % 4]
        c, o, n = int(rng.integers(1, 140)), int(rng.integers(1, 80)), int(rng.integers(1, 4))
        k, d = int(rng.integers(1, 4)), int(rng.integers(1, 3))
        size = int(rng.integers(k * d, 40 if large and trial % 3 == 0 else 20))
        attrs = {"strides": [int(rng.integers(1, 3))] * (1 if one_d else 2), "dilations": [d] * (1 if one_d else 2)}
        if trial % 7 == 3:
            attrs["auto_pad"] = ["SAME_UPPER", "SAME_LOWER", "VALID"][trial % 3]
        else:
            attrs["pads"] = [int(rng.integers(0, 3))] * (2 if one_d else 4)
        kernel, sizes = ((k,), (size,)) if one_d else ((k, int(rng.integers(1, 4))), (size, int(rng.integers(6, 30))))
        w = rng.standard_normal((o, c, *kernel)).astype(np.float32)
        x = rng.standard_normal((n, c, *sizes)) * rng.uniform(0.1, 10, (n,) + (1,) * len(kernel) + (1,))
        model = conv_model(w, rng.standard_normal(o).astype(np.float32), **attrs)
        lowered, _ = api.binarize(model, weight_bits=bits[0], activation_bits=bits[1])
        yield f"{trial}: {bits} C{c} O{o} N{n} {kernel} {sizes} {attrs}", lowered, {"X": x.astype(np.float32)}


def mismatches(library, count, seed=0, large=False) -> list[str]:
    """The cases where the native library and the PyOp bridge (the numba kernels) differ by a single bit."""
    wrong = []
    for name, lowered, feeds in lowered_cases(count, seed, large):
        (fast,) = _session(lowered, library).run(None, feeds)
        (reference,) = _session(lowered, pyop.register()).run(None, feeds)
        if fast.shape != reference.shape or not np.array_equal(fast, reference):
            wrong.append(name)
    return wrong


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CI machines are Linux with gcc")
def test_the_library_is_built_where_a_compiler_is():
    """Where a C compiler is, the install built the library: without this, every test of it would skip and a broken
    build would pass unnoticed."""
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler: the install could not build the library")
    assert native.library_path() is not None, native.path()


def test_native_equals_the_numba_kernels_bit_for_bit(library):
    """BitConv and MultibitBitConv over 24 geometries: the same float32 arithmetic in the same order, so the outputs
    are identical, not close (the kernels' tolerance against the float reference is kernels/reference.py's)."""
    assert runtime.custom_op_library(next(lowered_cases(1))[1]) == library
    assert mismatches(library, 24) == []


def _isas():
    """The register tiles this CPU can run (ONNXOPT_NATIVE_ISA); the AVX-512 one needs VPOPCNTQ."""
    from llvmlite import binding

    features = binding.get_host_cpu_features()
    found = ["generic"]
    if features.get("avx2"):
        found.append("avx2")
    if features.get("avx512f") and features.get("avx512vpopcntdq"):
        found.append("avx512")
    return found


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_every_instruction_set_equals_numba_on_both_tiles(library, isa, tmp_path):
    """Each register tile of the library (picked in a fresh process) against the numba kernels, 80 geometries with
    layers large enough for onnxruntime's threads. The AVX2 tile is checked against numba compiled for AVX2 only
    (its 4-channel tile, as on a CPU without AVX-512); the others against numba's tile for this CPU."""
    if isa not in _isas():
        pytest.skip(f"this CPU cannot run the {isa} tile")
    from onnxopt.kernels import AVX2_ONLY_ENV

    env = {**os.environ, "ONNXOPT_NATIVE_ISA": isa, "PYTHONPATH": f"{HERE}{os.pathsep}{HERE.parent}"}
    if isa == "avx2":
        env.update(AVX2_ONLY_ENV, NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    code = ("from onnxopt.runtime import native\nfrom test_native import mismatches\n"
            "print(native.isa(), mismatches(native.library_path(), 80, seed=1, large=True))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[0] == isa and out.stdout.strip().endswith("[]"), out.stdout


def test_onnxruntime_threads_change_speed_not_bits(library):
    """A layer large enough to be split runs on onnxruntime's intra-op pool: 1 and 2 threads give the same bits."""
    rng = np.random.default_rng(3)
    lowered, _ = api.binarize(conv_model(rng.standard_normal((96, 64, 3, 3)).astype(np.float32), pads=[1, 1, 1, 1]))
    feeds = {"X": rng.standard_normal((4, 64, 28, 28)).astype(np.float32)}
    (one,) = _session(lowered, library, threads=1).run(None, feeds)
    (two,) = _session(lowered, library, threads=2).run(None, feeds)
    (reference,) = _session(lowered, pyop.register()).run(None, feeds)
    assert np.array_equal(one, two) and np.array_equal(one, reference)


def test_calls_at_a_size_seen_before_allocate_nothing(library):
    """Per node, once: the weights' popcounts at kernel creation, the padding terms per input size; per thread, the
    buffers are reused. The library counts its allocations while computing: none after the first call at a size."""
    counter = ctypes.c_int64.in_dll(ctypes.CDLL(library), "onnxopt_native_allocations")
    rng = np.random.default_rng(4)
    lowered, _ = api.binarize(conv_model(rng.standard_normal((32, 16, 3, 3)).astype(np.float32), pads=[1, 1, 1, 1]))
    sess = _session(lowered, library, threads=1)
    small, large = (rng.standard_normal((1, 16, s, s)).astype(np.float32) for s in (14, 28))
    sess.run(None, {"X": small})
    sess.run(None, {"X": large})
    before = counter.value
    for _ in range(3):
        sess.run(None, {"X": small})
        sess.run(None, {"X": large})
    assert counter.value == before
    sess.run(None, {"X": rng.standard_normal((1, 16, 20, 20)).astype(np.float32)})  # a new size: a plan is made
    assert counter.value > before


def test_bad_input_is_an_error_not_a_crash(library):
    """A raw session (no onnxopt guard in front) fed the wrong channel count, a too-small image or the wrong rank:
    onnxruntime raises with the kernel's reason, and the process goes on."""
    lowered = onnxopt.binarize_convolution(conv_model(np.ones((4, 8, 3, 3), np.float32)))
    lowered.graph.input[0].type.tensor_type.ClearField("shape")  # so that onnxruntime lets any input through
    sess = _session(lowered, library)
    for x, text in ((np.ones((1, 7, 6, 6), np.float32), "input channels do not match"),
                    (np.ones((1, 8, 2, 2), np.float32), "smaller than the kernel's span"),
                    (np.ones((1, 8, 6), np.float32), "input rank"),
                    (np.array(1.0, np.float32), "input rank")):  # rank 0: no dim may be read
        with pytest.raises(Exception, match=text):
            sess.run(None, {"X": x})
    assert sess.run(None, {"X": np.ones((1, 8, 6, 6), np.float32)})[0].shape == (1, 4, 4, 4)


def test_weights_that_are_not_initializers_are_read_per_call(library):
    """Packed weights fed as a graph input (no per-node state possible): validated and used per call, the same bits
    as with the weights as initializers; a malformed one is refused with the reason."""
    rng = np.random.default_rng(5)
    lowered, _ = api.binarize(conv_model(rng.standard_normal((8, 16, 3, 3)).astype(np.float32)))
    node = next(n for n in lowered.graph.node if n.op_type == "BitConv")
    weights = next(i for i in lowered.graph.initializer if i.name == node.input[1])
    value = onnx.numpy_helper.to_array(weights)
    moved = onnx.ModelProto()
    moved.CopyFrom(lowered)
    moved.graph.initializer.remove(next(i for i in moved.graph.initializer if i.name == node.input[1]))
    moved.graph.input.append(onnx.helper.make_tensor_value_info(node.input[1], onnx.TensorProto.UINT64, None))
    x = rng.standard_normal((2, 16, 9, 9)).astype(np.float32)
    (given,) = _session(moved, library).run(None, {"X": x, node.input[1]: value})
    (constant,) = _session(lowered, library).run(None, {"X": x})
    assert np.array_equal(given, constant)
    with pytest.raises(Exception, match="packed weight must be uint64"):
        _session(moved, library).run(None, {"X": x, node.input[1]: value[:, :, :, :, None]})


def _far_padded(pads, strides):
    w = np.ones((1, 8, 1, 1), np.float32)
    model = conv_model(w, strides=strides, pads=[pads] * 4)
    return onnxopt.convert_to_native_binary_convolution(onnxopt.convert_to_binary_convolution(model))


def test_geometry_far_beyond_the_input_is_refused(library):
    """Stride 4096 and pads 65536 on a 1x1 input ask the kernel for 156 GiB: the native library, the PyOp bridge and
    the guarded session each refuse it before any allocation."""
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
import numpy as np, onnxruntime as ort
import onnxopt
so = ort.SessionOptions()
so.register_custom_ops_library(onnxopt.library_path())
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
    """The graph-side bound (kernels/geometry.py, no numba) and the numba kernel's own (kernels/bitconv.py) agree;
    the library's (binary.c's work_bytes) is checked by test_geometry_far_beyond_the_input_is_refused."""
    from onnxopt.kernels import bitconv, simd
    from onnxopt.kernels.geometry import TILE_PIXELS, Geometry, work_bytes

    assert TILE_PIXELS == simd.LANES
    for pads, strides, shape, kernel in ((0, 1, (2, 65, 30, 31), (3, 3)), (7, 3, (1, 3, 5, 70), (1, 9)),
                                         (65536, 4096, (1, 8, 1, 1), (1, 1))):
        g = Geometry.from_conv({"pads": [pads] * 4, "strides": [strides] * 2}, 2, shape[1])
        n, c, h, w = shape
        assert work_bytes(shape, kernel, g) == bitconv.work_bytes(n, h, w, c, *kernel, g.encode())


def test_other_custom_ops_and_the_switch_use_pyop(library):
    transformed = onnxopt.convert_to_binary_convolution(conv_model(np.ones((4, 8, 3, 3), np.float32)))
    assert runtime.custom_op_library(transformed) == pyop.register()  # BinaryConv is not lowered
    assert runtime.custom_op_library(None) == pyop.register()  # user code without a model: every op
    code = "from onnxopt.runtime import native; print(native.path())"
    for env, word in (({"ONNXOPT_KERNEL_PATH": "pyop"}, "PyOp bridge"), ({}, "native library")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                             env={**os.environ, **env})
        assert out.returncode == 0 and out.stdout.startswith(word), out.stderr


def test_version_and_library_path_commands(library):
    r = cli("--version")
    assert r.returncode == 0 and f"native library ({library}, {native.isa()} kernels)" in r.stdout, r.stderr
    r = cli("library-path")
    assert r.returncode == 0 and r.stdout.strip() == library == onnxopt.library_path()
    r = cli("library-path", env={**os.environ, "ONNXOPT_KERNEL_PATH": "pyop"})
    assert r.returncode == 1 and r.stdout == "" and r.stderr.count("\n") == 1 and "PyOp bridge" in r.stderr


SERVE_SCRIPT = """
import os, sys
import numpy as np
import onnxopt
sess = onnxopt.session(sys.argv[1])
(y,) = sess.run(None, {"X": np.load(sys.argv[2])})
np.save(sys.argv[3], y)
print("numba" in sys.modules, "torch" in sys.modules)
"""


def test_serving_compiles_nothing_and_loads_no_numba(library, tmp_path):
    """A lowered model served with no C compiler on PATH: onnxopt.session runs it without importing numba, and
    nothing is written into the installed package (no numba cache, no compiled shim); same bits as in this process."""
    rng = np.random.default_rng(6)
    lowered, _ = api.binarize(conv_model(rng.standard_normal((16, 8, 3, 3)).astype(np.float32), pads=[1, 1, 1, 1]))
    onnx.save(lowered, tmp_path / "m.onnx")
    x = rng.standard_normal((2, 8, 10, 10)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    package = Path(onnxopt.__file__).parent
    before = sorted(str(p) for p in package.rglob("*"))
    bare = tmp_path / "bin"  # PATH: nothing but python
    bare.mkdir()
    (bare / "python").symlink_to(sys.executable)
    assert shutil.which("cc", path=str(bare)) is None and shutil.which("gcc", path=str(bare)) is None
    env = {**os.environ, "PATH": str(bare), "CC": "/nonexistent/cc"}
    out = subprocess.run([sys.executable, "-c", SERVE_SCRIPT, str(tmp_path / "m.onnx"), str(tmp_path / "x.npy"),
                          str(tmp_path / "y.npy")], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"], out.stdout  # numba, torch
    assert sorted(str(p) for p in package.rglob("*")) == before
    assert np.array_equal(np.load(tmp_path / "y.npy"), onnxopt.session(lowered).run(None, {"X": x})[0])


def onnxruntime_c_library() -> tuple[str, str]:
    """(path, what) of a non-Python onnxruntime: the npm package onnxruntime-node's libonnxruntime.so.1 (fetched
    once into ONNXOPT_MODELS_CACHE or ~/.cache/onnxopt-tests), else the wheel's own C library (the same C API)."""
    cache = Path(os.environ.get("ONNXOPT_MODELS_CACHE") or Path.home() / ".cache" / "onnxopt-tests") / "npm"
    found = sorted(cache.glob("package/bin/napi-v*/linux/x64/libonnxruntime.so.1"))
    if not found and shutil.which("npm") and sys.platform.startswith("linux"):
        cache.mkdir(parents=True, exist_ok=True)
        pack = subprocess.run(["npm", "pack", "onnxruntime-node@1.30.0", "--silent"], cwd=cache, capture_output=True,
                              text=True, timeout=600)
        tarball = cache / pack.stdout.strip().splitlines()[-1] if pack.returncode == 0 and pack.stdout.strip() else None
        if tarball and tarball.exists():
            subprocess.run(["tar", "xzf", str(tarball), "--wildcards", "package/bin/*/linux/x64/*"], cwd=cache,
                           timeout=600)
            tarball.unlink()
            found = sorted(cache.glob("package/bin/napi-v*/linux/x64/libonnxruntime.so.1"))
    if found:
        return str(found[-1]), "onnxruntime-node (npm)"
    wheel = sorted((Path(ort.__file__).parent / "capi").glob("libonnxruntime.so*"))
    return str(wheel[0]), "the onnxruntime wheel's C library"


def build_c_host(tmp_path) -> Path:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the host program")
    host = tmp_path / "c_host"
    subprocess.run([compiler, "-O2", "-o", str(host), str(HERE / "c_host.c"), "-ldl"], check=True, timeout=120)
    return host


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the host program uses dlopen of a Linux .so")
def test_a_c_program_runs_a_lowered_model_bit_for_bit(library, tmp_path):
    """Deployment outside Python: a C program on onnxruntime's C API (onnxruntime-node's library from npm: no Python
    anywhere) registers the native library with RegisterCustomOpsLibrary_V2 and runs a lowered two-layer model;
    its output equals the Python session's bit for bit."""
    ort_library, what = onnxruntime_c_library()
    host = build_c_host(tmp_path)
    rng = np.random.default_rng(7)
    first, _ = api.binarize(conv_model(rng.standard_normal((24, 16, 3, 3)).astype(np.float32), pads=[1, 1, 1, 1]),
                            weight_bits=2, activation_bits=2)
    onnx.save(first, tmp_path / "m.onnx")
    x = rng.standard_normal((2, 16, 12, 12)).astype(np.float32)
    x.tofile(tmp_path / "x.bin")
    out = subprocess.run([str(host), ort_library, library, str(tmp_path / "m.onnx"), "X", "Y", str(tmp_path / "x.bin"),
                          str(tmp_path / "y.bin"), "1", *map(str, x.shape)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, f"{what}: {out.stderr}"
    (expected,) = onnxopt.session(first).run(None, {"X": x})
    assert np.array_equal(np.fromfile(tmp_path / "y.bin", np.float32), expected.reshape(-1)), what
