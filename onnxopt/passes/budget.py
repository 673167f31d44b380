"""What `--budget` means for every technique that takes one (factor's ranks, prune's channels): the spec
`KIND=FRACTION` of the dense model's params or FLOPs, or KIND=auto, and the one message for a budget no
allocation can meet."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UsageError

KINDS = ("params", "flops")

AUTO = "auto"


@dataclass(frozen=True)
class BudgetSpec:
    """`params=0.5`, `flops=0.4`, or `params=auto` (the smallest budget that passes --max-drop on --data)."""

    kind: str
    fraction: float | None  # None: auto

    @classmethod
    def parse(cls, text: str) -> "BudgetSpec":
        kind, sep, value = str(text).strip().partition("=")
        if sep and kind in KINDS:
            if value == AUTO:
                return cls(kind, None)
            try:
                fraction = float(value)
            except ValueError:
                fraction = math.nan
            if 0 < fraction <= 1:
                return cls(kind, fraction)
        raise UsageError(f"invalid --budget '{text}': expected params=F or flops=F with F in (0, 1], "
                         f"or params=auto / flops=auto with --max-drop and --data")

    def __str__(self) -> str:
        return f"{self.kind}={AUTO if self.fraction is None else f'{self.fraction:g}'}"


def unreachable(kind: str, fraction: float, smallest: float, floor: str) -> UsageError:
    """The error for a budget below what any allocation reaches: the smallest one possible, and what it keeps
    (`floor`: rank 1 per layer, one channel per group)."""
    smallest = math.ceil(smallest * 1000) / 1000
    return UsageError(f"--budget {kind}={fraction:g} cannot be met: the smallest budget possible is "
                      f"{kind}={smallest:g} ({floor})")
