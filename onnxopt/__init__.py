"""onnxopt: make ONNX models cheaper — low-rank dense layers, binarized convolutions.

The folders follow the pipeline: graph/ (load, select, shapes) → passes/ (rewrite) → recover/ (refit, fine-tune,
train) → pipeline/ (commands as lists of steps: check, gate, save), with measure/, runtime/ (serve time) and
kernels/ (numba) beside them. The API (api.py) has one function per command; netopt.py keeps CNTK netopt's
names. Heavy imports (onnxruntime, numba) happen only when used.
"""
from __future__ import annotations

from .errors import GateFailed, OnnxoptError, UsageError

__version__ = "0.1.0"

_API = {
    "factor": "api", "binarize": "api", "prune": "api", "lower": "api", "quantize": "api", "finetune": "api",
    "apply": "api", "inspect": "api", "sweep": "api", "sensitivity": "api",
    "run": "api", "check": "api",
    "compare": "api",
    "factor_dense": "netopt", "binarize_convolution": "netopt", "convert_to_binary_convolution": "netopt",
    "convert_to_native_binary_convolution": "netopt", "factor_with_report": "netopt",
    "binarize_with_report": "netopt", "lower_with_report": "netopt",
    "session": "runtime", "session_options": "runtime", "library_path": "runtime.native",
    "load_model": "graph.io", "save_model": "graph.io",
}

__all__ = sorted(_API) + ["OnnxoptError", "UsageError", "GateFailed"]


def __getattr__(name):
    import importlib

    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    from .pipeline.registry import COMMANDS

    if name in COMMANDS:  # a command registered beyond the built-in ones
        return getattr(importlib.import_module(".api", __name__), name)
    raise AttributeError(f"module 'onnxopt' has no attribute {name!r}")
