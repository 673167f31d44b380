"""`quantize`'s options: calibration data (static QDQ) or none (dynamic), per-channel scales."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...options import check_calibration, option


@dataclass
class QuantizeOptions:
    """`quantize`: int8 through onnxruntime.quantization."""

    calibration: Any = option(help="Inputs keyed by graph input name: static int8 (QDQ, activations too); "
                                   "without it, dynamic int8 (weights; MatMul and Conv only).", metavar="FILE.npz",
                              path=True)
    per_channel: bool = option(False, "One weight scale per output channel instead of per tensor.")

    def __post_init__(self):
        check_calibration(self.calibration)
