"""The native custom-op library: every lowered op (BitConv, MultibitBitConv, the packed-bit chain ops) in C, built
when onnxopt is installed (library.c with kernels/native/binary.c), loadable by any onnxruntime >= 1.16 from Python,
C, C++, C#, Java (docs/deploy.md). Serving needs neither numba nor a compiler.

`library_path()` is what `SessionOptions.register_custom_ops_library` takes (as onnxruntime-extensions'
`get_library_path()`); None where the install had no C compiler, or with ONNXOPT_KERNEL_PATH=pyop: sessions then
use the PyOp bridge (runtime/pyop.py: the numba kernels through Python, slower), and `path()` says why.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import os
from pathlib import Path

NAME = "_onnxopt_ops"


def _built() -> Path | None:
    folder = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (folder / f"{NAME}{suffix}").is_file():
            return folder / f"{NAME}{suffix}"
    return None


def library_path() -> str | None:
    """The native library's path, or None (see `path()` for why)."""
    if os.environ.get("ONNXOPT_KERNEL_PATH", "").lower() == "pyop":
        return None
    found = _built()
    return str(found) if found else None


@functools.cache
def isa() -> str:
    """The register tile the library runs here: avx512 (VPOPCNTQ), avx2 or generic (ONNXOPT_NATIVE_ISA picks one
    this CPU can run, for tests and benchmarks; set it before the first session)."""
    library = ctypes.CDLL(library_path())
    library.onnxopt_native_isa.restype = ctypes.c_char_p
    return library.onnxopt_native_isa().decode()


def path() -> str:
    """Which path lowered layers run on in this process, in words."""
    found = library_path()
    if found:
        return f"native library ({found}, {isa()} kernels)"
    if os.environ.get("ONNXOPT_KERNEL_PATH", "").lower() == "pyop":
        return "PyOp bridge (ONNXOPT_KERNEL_PATH=pyop)"
    return ("PyOp bridge (the native library was not built: onnxopt was installed without a C compiler, or this is "
            "a source checkout never installed with `pip install -e .`; reinstall with a compiler for faster lowered "
            "layers)")
