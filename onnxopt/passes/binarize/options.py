"""`binarize`'s and `lower`'s options: scale, stage, levels per layer, BatchNormalization folding."""
from __future__ import annotations

from dataclasses import dataclass

from ...errors import UsageError
from ...options import choice, int_pair, option, pairs

SCALES = ("channel", "tensor", "none")


STAGES = ("transform", "all")


@dataclass
class BinarizeOptions:
    """`binarize`: the scale of the binarized weights and where the pipeline stops."""

    scale: str = option("channel", f"alpha: mean |W| per output channel, one for the tensor, or 1 "
                                   f"({'|'.join(SCALES)}).", metavar="|".join(SCALES))
    stage: str = option("all", "transform: stop at the trainable BinaryConv model; all: lower to bit-packed "
                               "BitConv too.", metavar="|".join(STAGES))
    emulate: bool = option(False, "Write the transformed model in standard ONNX ops only (Greater/Where + Conv + "
                                  "Mul/Add) for external trainers; implies --stage transform. `onnxopt lower` "
                                  "reads it back.")
    weight_bits: int = option(1, "Weight levels Kw (1..4): residual binarization, one scale per level and output "
                                 "channel (netopt's MultibitKernel).", metavar="KW", kind=int)
    activation_bits: int = option(1, "Activation levels Ka (1..4): residual binarization of each sample at run time "
                                     "(netopt's Multibit); 1 is b(X) with no scale.", metavar="KA", kind=int)
    bits_for: tuple = option(help="Per-layer levels, e.g. conv3=2x2; first match wins (repeatable).",
                             metavar="PATTERN=KWxKA", repeat=True)

    def __post_init__(self):
        choice(self.scale, SCALES, "scale")
        choice(self.stage, STAGES, "stage")
        self.bits = (_levels(self.weight_bits, "--weight-bits"), _levels(self.activation_bits, "--activation-bits"))
        self.bits_overrides = [(p, _bits_pair(v)) for p, v in pairs(self.bits_for, "--bits-for")]
        self.patterns = tuple(("--bits-for", p) for p, _ in self.bits_overrides)


def _levels(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4:
        raise UsageError(f"invalid {what} {value}: give a number of levels from 1 to 4")
    return value


def _bits_pair(text) -> tuple[int, int]:
    """`KWxKA`, e.g. 2x2."""
    pair = int_pair(text, largest=4)
    if pair is None:
        raise UsageError(f"invalid --bits-for levels '{text}': expected KWxKA with levels 1..4, like 2x2")
    return pair


@dataclass
class LowerOptions:
    """`lower` (also the last step of `binarize`)."""

    keep_batchnorm: bool = option(False, "Do not fold a BatchNormalization after a lowered conv into its "
                                          "alpha/bias (folding saves a pass over the output; outputs then differ "
                                          "by float32 rounding only).")
