"""onnxopt: make ONNX models cheaper — low-rank dense layers, binarized convolutions.

Pipeline (pipeline.py): load (model) → select → rewrite (passes/*) → [refit, finetune, train (train/*)] → lower
→ check → gate → save. The API (api.py) has one function per command; netopt.py keeps CNTK netopt's
names. Heavy imports (onnxruntime, numba) happen only when used.
"""
from .errors import GateFailed, OnnxoptError, UsageError

__version__ = "0.1.0"

_API = {
    "factor": "api", "binarize": "api", "prune": "api", "lower": "api", "quantize": "api", "finetune": "api",
    "apply": "api", "inspect": "api",
    "run": "api", "check": "api",
    "compare": "api",
    "factor_dense": "netopt", "binarize_convolution": "netopt", "convert_to_binary_convolution": "netopt",
    "convert_to_native_binary_convolution": "netopt", "factor_with_report": "netopt",
    "binarize_with_report": "netopt", "lower_with_report": "netopt",
    "session": "runtime", "session_options": "runtime",
    "load_model": "model", "save_model": "model",
}

__all__ = sorted(_API) + ["OnnxoptError", "UsageError", "GateFailed"]


def __getattr__(name):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'onnxopt' has no attribute {name!r}")
