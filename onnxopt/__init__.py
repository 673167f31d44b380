"""onnxopt: make ONNX models cheaper — low-rank dense layers, binarized convolutions.

Pipeline: load (model) → select → rewrite (passes/*) → [train hook] → lower → save.
Names follow CNTK netopt. Heavy imports (onnxruntime, numba) happen only when used.
"""
from .errors import GateFailed, OnnxoptError, UsageError

__version__ = "0.1.0"

_API = {
    "factor_dense": "api", "factor_with_report": "api",
    "binarize_convolution": "api", "convert_to_binary_convolution": "api",
    "convert_to_native_binary_convolution": "api", "binarize_with_report": "api", "lower_with_report": "api",
    "session": "runtime", "session_options": "runtime",
    "load_model": "model", "save_model": "model",
}

__all__ = sorted(_API) + ["OnnxoptError", "UsageError", "GateFailed"]


def __getattr__(name):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'onnxopt' has no attribute {name!r}")
