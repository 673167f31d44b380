"""The lowered ops (com.onnxopt::BitConv, MultibitBitConv, and the packed-bit chain ops of runtime/chains.py) with
no Python on the call path: the numba kernels as C-callable functions (@cfunc, no GIL), called by a small C
library (ortshim.c) that onnxruntime loads as a custom-op library.

The library is compiled from ortshim.c with the system C compiler on first use and cached (ONNXOPT_CACHE_DIR,
default ~/.cache/onnxopt), then loaded with ctypes so that onnxopt_set_kernels() can hand it each op's two cfunc
addresses (cabi_bitconv.py, cabi_multibit.py, cabi_chain.py: imported, so compiled or loaded by numba, only when
a model needs that op) before onnxruntime opens the same path (dlopen returns the handle already open). Without
a compiler, or with ONNXOPT_KERNEL_PATH=pyop, sessions use the PyOp bridge (runtime/pyop.py); `path()` says
which.

The C path serves the lowered ops and the chain ops; a model with a trainable com.onnxopt op runs on the PyOp
bridge as a whole.
Validation lives here too, as integer checks before any memory is touched: a bad input makes session.run raise
with one of PROBLEMS, never a crash.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
from numba import carray, njit, types

from ..graph import schemas as ops
from ..graph.schemas import MAX_LEVELS
from ..kernels import bitconv, chain
from ..kernels.cache import unsafe_because
from ..kernels.geometry import MAX_PAD, MAX_STEP, MAX_WORK_BYTES

SOURCE = Path(__file__).with_name("ortshim.c")
SLOTS = 8  # per input in the dims buffer: rank, then up to 7 dims (ortshim.c)
MAX_INPUTS = 6
OUT = MAX_INPUTS * SLOTS  # where the 4 output dims go, then the output's rank (OUT + 4)


PROBLEMS = (
    "",
    "onnxopt: geometry must be int64 values within range (11 for BitConv; 11 + activation levels 1..4 for "
    "MultibitBitConv)",
    "onnxopt: packed weight must be uint64 [kh, kw, ceil(channels/64), O or levels*O] (kh = 1 for 1-D)",
    "onnxopt: alpha must be float32 [O] (BitConv) or [weight levels 1..4, O] (MultibitBitConv)",
    "onnxopt: bias must be float32 [O]",
    "onnxopt: input rank does not match the layer (4 for 2-D, 3 for 1-D)",
    "onnxopt: input channels do not match the layer",
    "onnxopt: input has an empty spatial dim",
    "onnxopt: input is smaller than the kernel's span: no output",
    "onnxopt: pool must be 10 int64 values within range (kernel, strides, dilations, pads)",
    "onnxopt: packed input must be uint64 [N, H, words(channels), W] of a 2-D layer",
    f"onnxopt: the kernel's padded input for this input and geometry would exceed {MAX_WORK_BYTES >> 30} GiB "
    "(pads or strides far beyond the input)",
    "onnxopt: the kernel failed (out of memory?)",
)
TOO_LARGE, KERNEL_FAILED = 11, 12
W, ALPHA, BIAS, GEOMETRY, POOL = SLOTS, 2 * SLOTS, 3 * SLOTS, 4 * SLOTS, 5 * SLOTS  # each input's rank in dims


@njit(cache=True, nogil=True)
def _geometry_problem(g) -> int:
    """kernels.geometry.geometry_problem's checks, as integers (1: a problem)."""
    if g[0] != 1 and g[0] != 2:
        return 1
    for i in (1, 2, 7, 8):
        if g[i] < 1 or g[i] > MAX_STEP:
            return 1
    for i in (3, 4, 5, 6):
        if g[i] < 0 or g[i] > MAX_PAD:
            return 1
    if g[9] < 0 or g[9] > 3 or g[10] < 1:
        return 1
    if g[0] == 1 and (g[1] != 1 or g[7] != 1 or g[3] != 0 or g[5] != 0):
        return 1
    return 0


@njit(cache=True, nogil=True)
def _input_sizes(dims):
    """(n, c, h, w) of the input, Conv1d given a height of 1."""
    if dims[0] == 3:
        return dims[1], dims[2], 1, dims[3]
    return dims[1], dims[2], dims[3], dims[4]


@njit(cache=True, nogil=True)
def _constants_problem(dims, g, multibit) -> int:
    """The PROBLEMS code of the weight, alpha, bias and geometry shapes (0: none), from their dims."""
    if dims[GEOMETRY + 1] != (12 if multibit else 11) or _geometry_problem(g):
        return 1
    if multibit and (g[11] < 1 or g[11] > MAX_LEVELS):
        return 1
    if dims[W] != 4 or dims[W + 1] < 1 or dims[W + 2] < 1 or dims[W + 4] < 1 or dims[W + 3] != (g[10] + 63) // 64:
        return 2
    if g[0] == 1 and dims[W + 1] != 1:
        return 2
    levels = dims[ALPHA + 1] if multibit else 1
    o = dims[ALPHA + 2] if multibit else dims[ALPHA + 1]
    if dims[ALPHA] != (2 if multibit else 1) or levels < 1 or levels > MAX_LEVELS or dims[W + 4] != levels * o:
        return 3
    if dims[BIAS] != 1 or dims[BIAS + 1] != o:
        return 4
    return 0


@njit(cache=True, nogil=True)
def _set_output(dims, n, a, b, c, rank):
    dims[OUT], dims[OUT + 1], dims[OUT + 2], dims[OUT + 3], dims[OUT + 4] = n, a, b, c, rank
    return 0


@njit(cache=True, nogil=True)
def shape(dims, data, multibit) -> int:
    """0 and the output dims in dims[OUT:OUT+5], or the PROBLEMS code of what is wrong."""
    g = carray(data[4], (dims[GEOMETRY + 1],), np.int64)
    code = _constants_problem(dims, g, multibit)  # checks the geometry's length before reading it
    if code:
        return code
    if dims[0] != g[0] + 2:
        return 5
    n, c, h, x_w = _input_sizes(dims)
    if c != g[10]:
        return 6
    if h < 1 or x_w < 1:
        return 7
    o = dims[ALPHA + 2] if multibit else dims[ALPHA + 1]
    out = bitconv.output_shape(n, h, x_w, dims[W + 1], dims[W + 2], o, g)
    if out[2] < 1 or out[3] < 1:
        return 8
    if bitconv.work_bytes(n, h, x_w, c, dims[W + 1], dims[W + 2], g, g[11] if multibit else 1) > MAX_WORK_BYTES:
        return TOO_LARGE
    return _set_output(dims, out[0], out[1], out[2], out[3], dims[0])


@njit(cache=True, nogil=True)
def _pool_problem(dims, pool) -> int:
    if dims[POOL] != 1 or dims[POOL + 1] != chain.POOL_LENGTH:
        return 9
    for i in range(6):
        if pool[i] < 1 or pool[i] > MAX_STEP:
            return 9
    for i in range(6, 10):
        if pool[i] < 0 or pool[i] > MAX_PAD:
            return 9
    return 0


@njit(cache=True, nogil=True)
def chained_shape(dims, data, emit_signs) -> int:
    """`shape` for PackedBitConv (emit_signs False: float output) and PackedBitConvSigns (sign bits out)."""
    g = carray(data[4], (dims[GEOMETRY + 1],), np.int64)
    code = _constants_problem(dims, g, False)
    if code:
        return code
    pool = carray(data[5], (max(dims[POOL + 1], 0),), np.int64)
    if _pool_problem(dims, pool):
        return 9
    if g[0] != 2 or dims[0] != 4 or dims[3] != (g[10] + 63) // 64:
        return 10
    n, h_in, w_in = dims[1], dims[2], dims[4]
    if h_in < 1 or w_in < 1:
        return 7
    h, w = chain.pooled_shape(h_in, w_in, pool)
    if h < 1 or w < 1:
        return 8
    o = dims[ALPHA + 1]
    _, _, oh, ow = bitconv.output_shape(n, h, w, dims[W + 1], dims[W + 2], o, g)
    if oh < 1 or ow < 1:
        return 8
    if bitconv.work_bytes(n, h, w, g[10], dims[W + 1], dims[W + 2], g) > MAX_WORK_BYTES:
        return TOO_LARGE
    if emit_signs:
        return _set_output(dims, n, oh, (o + 63) // 64, ow, 4)
    return _set_output(dims, n, o, oh, ow, 4)


@njit(cache=True, nogil=True)
def pack_signs_shape(dims) -> int:
    """`shape` for PackSigns: float (N, C, H, W) → uint64 (N, H, words(C), W)."""
    if dims[0] != 4:
        return 5
    return _set_output(dims, dims[1], dims[3], (dims[2] + 63) // 64, dims[4], 4)


@njit(cache=True, nogil=True)
def tensors(data, dims):
    """(x, packed weight, bias, geometry, out) as arrays over onnxruntime's buffers, for tensors `shape`
    accepted; the output is already allocated with its dims."""
    n, c, h, w = _input_sizes(dims)
    x = carray(data[0], (n, c, h, w), np.float32)
    wp = carray(data[1], (dims[W + 1], dims[W + 2], dims[W + 3], dims[W + 4]), np.uint64)
    bias = carray(data[3], (dims[BIAS + 1],), np.float32)
    geometry = carray(data[4], (dims[GEOMETRY + 1],), np.int64)
    out = carray(data[MAX_INPUTS], (dims[OUT], dims[OUT + 1], dims[OUT + 2], dims[OUT + 3]), np.float32)
    return x, wp, bias, geometry, out


@njit(cache=True, nogil=True)
def chained_tensors(data, dims):
    """(bits, packed weight, alpha, bias, geometry, pool) of a PackedBitConv(Signs) that chained_shape accepted."""
    bits = carray(data[0], (dims[1], dims[2], dims[3], dims[4]), np.uint64)
    wp = carray(data[1], (dims[W + 1], dims[W + 2], dims[W + 3], dims[W + 4]), np.uint64)
    alpha = carray(data[2], (dims[ALPHA + 1],), np.float32)
    bias = carray(data[3], (dims[BIAS + 1],), np.float32)
    geometry = carray(data[4], (dims[GEOMETRY + 1],), np.int64)
    pool = carray(data[5], (dims[POOL + 1],), np.int64)
    return bits, wp, alpha, bias, geometry, pool


SHAPE = types.int64(types.CPointer(types.int64), types.CPointer(types.voidptr))
COMPUTE = types.int64(types.CPointer(types.voidptr), types.CPointer(types.int64))
# per op: its position in ortshim.c's op tables and the module of its entry points (ENTRY_POINTS[op type])
ENTRY_MODULES = {ops.BIT_CONV: (0, "onnxopt.runtime.cabi_bitconv"),
                 ops.MULTIBIT_BIT_CONV: (1, "onnxopt.runtime.cabi_multibit"),
                 ops.PACK_SIGNS: (2, "onnxopt.runtime.cabi_chain"),
                 ops.PACKED_BIT_CONV: (3, "onnxopt.runtime.cabi_chain"),
                 ops.PACKED_BIT_CONV_SIGNS: (4, "onnxopt.runtime.cabi_chain")}
# per op: the numba kernel its entry points compile in; a cold cache for it means loading them compiles (announced)
ENTRY_KERNELS = {ops.BIT_CONV: ("onnxopt.kernels.bitconv", "bit_conv_into"),
                 ops.MULTIBIT_BIT_CONV: ("onnxopt.kernels.multibit", "multibit_bit_conv_into"),
                 ops.PACK_SIGNS: ("onnxopt.kernels.chain", "pack_signs_into"),
                 ops.PACKED_BIT_CONV: ("onnxopt.kernels.chain", "packed_conv_into"),
                 ops.PACKED_BIT_CONV_SIGNS: ("onnxopt.kernels.chain", "packed_conv_into")}


_lock = threading.Lock()
_state: dict = {}  # "path": the loaded library's path, or "error": why the C path is off


def _cache_dir() -> Path:
    folder = os.environ.get("ONNXOPT_CACHE_DIR")
    return Path(folder) if folder else Path.home() / ".cache" / "onnxopt"


def _private_cache() -> Path:
    """The cache folder, made private (0700) if new; a folder another user could write into is not used: the
    library is then built in a fresh temporary folder for this process (~1 s more), with one warning."""
    folder = _cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        problem = unsafe_because(folder)
    except OSError as exc:
        problem = f"{folder}: {exc.strerror}"
    if problem is None:
        return folder
    print(f"onnxopt: warning: not using the kernel cache ({problem}); building in a private temporary folder",
          file=sys.stderr)
    return Path(tempfile.mkdtemp(prefix="onnxopt-shim-"))


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _build() -> Path:
    """The compiled library, built once per source text and compiler, loaded only from a private folder and only
    if it is the file this package built there (its sha256 is recorded beside it at build time)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc) on PATH")
    digest = hashlib.sha256(SOURCE.read_bytes() + compiler.encode()).hexdigest()[:16]
    folder = _private_cache()
    target, record = folder / f"ortshim-{digest}.so", folder / f"ortshim-{digest}.so.sha256"
    try:
        if unsafe_because(target) is None and unsafe_because(record) is None and \
                record.read_text().strip() == _file_digest(target):
            return target
    except OSError:
        pass  # not built yet (or half): build it
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".so", delete=False) as tmp:
        pass
    result = subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", tmp.name, str(SOURCE)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        os.unlink(tmp.name)
        raise OSError(f"{compiler} failed: {result.stderr.strip().splitlines()[-1:]}")
    os.chmod(tmp.name, 0o700)
    with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".sha256", delete=False) as note:
        note.write(_file_digest(Path(tmp.name)))
    os.replace(tmp.name, target)  # atomic: a concurrent process sees the old or the whole new file
    os.replace(note.name, record)
    return target


def _hand_over_threading(library) -> None:
    """Give ortshim.c numba's per-thread `set_num_threads` (registered with llvmlite once numba's thread pool
    runs: kernels/bitconv.py's import starts it) and the pool's size, for its contention governor. Without it the
    kernels use numba's setting as it is."""
    from llvmlite import binding
    from numba import config

    address = binding.address_of_symbol("set_num_threads")
    library.onnxopt_set_threading.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    library.onnxopt_set_threading(address, config.NUMBA_NUM_THREADS)


def _load() -> str:
    path = _build()
    library = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    texts = (ctypes.c_char_p * len(PROBLEMS))(*(p.encode() for p in PROBLEMS))
    library.onnxopt_set_problems.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    library.onnxopt_set_problems(ctypes.cast(texts, ctypes.c_void_p), len(PROBLEMS))
    library.onnxopt_set_kernels.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    _hand_over_threading(library)
    _state["library"], _state["texts"] = library, texts  # the C side points into these
    _state["ready"] = set()
    return str(path)


def _provide(op_types) -> None:
    """Hand the C library the entry points of `op_types` not handed over yet (before a session needs them).
    Importing an entry module makes numba compile its cfuncs (first use on this machine, announced) or load
    them from its cache (~0.1 s a pair)."""
    import importlib

    from .pyop import compile_notice

    missing = sorted(set(op_types) - _state["ready"])
    for op_type in missing:
        kernel_module, kernel = ENTRY_KERNELS[op_type]
        compile_notice(getattr(importlib.import_module(kernel_module), kernel))
    for op_type in missing:
        index, module = ENTRY_MODULES[op_type]
        shape, compute = importlib.import_module(module).ENTRY_POINTS[op_type]
        _state["library"].onnxopt_set_kernels(index, shape.address, compute.address)
        _state["ready"].add(op_type)


def library_path(op_types=(ops.BIT_CONV,)) -> str | None:
    """The C-path library for SessionOptions.register_custom_ops_library, ready to run `op_types` (lowered op
    types), or None (see `path()` for why)."""
    with _lock:
        if "path" not in _state and "error" not in _state:
            if os.environ.get("ONNXOPT_KERNEL_PATH", "").lower() == "pyop":
                _state["error"] = "ONNXOPT_KERNEL_PATH=pyop"
            else:
                try:
                    _state["path"] = _load()
                except OSError as exc:
                    _state["error"] = str(exc)
                    print(f"onnxopt: warning: the C kernel path is off ({exc}); using the PyOp bridge",
                          file=sys.stderr)
        if "path" in _state:
            _provide(op_types)
    return _state.get("path")


def path() -> str:
    """Which path lowered BitConv layers run on in this process, in words."""
    found = library_path()
    return f"C ABI ({found})" if found else f"PyOp bridge ({_state['error']})"
