"""`quantize`'s options: calibration data (static QDQ) or none (dynamic), per-channel scales."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...errors import UsageError
from ...options import check_calibration, choice, option

ALGORITHMS = ("rtn", "hqq")  # onnxruntime's weight-only quantizers that need no calibration data


@dataclass
class QuantizeOptions:
    """`quantize`: int8, or 4-bit weight-only MatMul, through onnxruntime.quantization."""

    calibration: Any = option(help="Inputs keyed by graph input name: static int8 (QDQ, activations too); "
                                   "without it, dynamic int8 (weights; MatMul and Conv only).", metavar="FILE.npz",
                              path=True)
    per_channel: bool = option(False, "One weight scale per output channel instead of per tensor.")
    weight_bits: int = option(8, "8: int8 (dynamic or static); 4: weight-only 4-bit MatMul weights in blocks "
                                 "(onnxruntime's MatMulNBits, com.microsoft), activations stay float.",
                              metavar="8|4", kind=int)
    block_size: int = option(32, "With --weight-bits 4: weights per scale along the input axis (16..256, a "
                                 "power of two).", metavar="N", kind=int)
    algorithm: str = option("rtn", "With --weight-bits 4: rtn (round to nearest) or hqq (half-quadratic "
                                   "optimization of the scales and zero points).", metavar="rtn|hqq")

    def __post_init__(self):
        check_calibration(self.calibration)
        if self.weight_bits not in (4, 8):
            raise UsageError(f"invalid --weight-bits {self.weight_bits}: choose 8 or 4")
        if self.block_size < 16 or self.block_size > 256 or self.block_size & (self.block_size - 1):
            raise UsageError(f"invalid --block-size {self.block_size}: a power of two from 16 to 256")
        choice(self.algorithm, ALGORITHMS, "--algorithm")
        if self.weight_bits == 4 and (self.calibration is not None or self.per_channel):
            raise UsageError("--weight-bits 4 is weight-only: it takes no --calibration or --per-channel")
