"""Recovering accuracy after a rewrite: calibration activations and refit (calibrate), distillation fine-tuning
in torch (distill, torch_graph; torch is the optional `train` extra), training hooks and external trainers
(hooks)."""
from __future__ import annotations

from ..errors import OnnxoptError

INSTALL_TORCH = ("pip install 'onnxopt[train]' (CPU-only machines: pip install torch --index-url "
                 "https://download.pytorch.org/whl/cpu first)")


def require_torch(feature: str) -> None:
    """Fail with how to install torch when it is missing (exit 1), before any work is done."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise OnnxoptError(f"{feature} needs torch, which is not installed: {INSTALL_TORCH}") from None
