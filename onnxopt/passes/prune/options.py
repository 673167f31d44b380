"""`prune`'s options: keep fraction, per-layer overrides, budget."""
from __future__ import annotations

from dataclasses import dataclass

from ...errors import UsageError
from ...options import option, pairs


def _fraction(text, what: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = -1.0
    if not 0 < value <= 1:
        raise UsageError(f"invalid {what} '{text}': give the fraction of channels to keep, in (0, 1]")
    return value


@dataclass
class PruneOptions:
    """`prune`: how many output channels each prunable layer keeps."""

    keep: float | None = option(help="Fraction of output channels (Gemm: output features) each prunable layer "
                                     "keeps, in (0, 1].", metavar="F", kind=float)
    keep_for: tuple = option(help="Per-layer fraction; first match wins (repeatable). Layers tied by a residual "
                                  "Add share one channel set: the first of them that matches decides.",
                             metavar="PATTERN=F", repeat=True)
    budget: str | None = option(help="Choose each layer's channel count so that the prunable layers keep at most "
                                     "fraction F of their params (or FLOPs per sample), losing as little as possible.",
                                metavar="params=F|flops=F")

    def __post_init__(self):
        from ..budget import BudgetSpec

        if self.keep is None and not self.keep_for and self.budget is None:
            raise UsageError("give --keep F (the fraction of channels to keep, e.g. 0.5), --keep-for PATTERN=F or "
                             "--budget flops=F")
        if self.keep is not None and self.budget is not None:
            raise UsageError("--keep and --budget exclude each other (--keep-for pins single layers)")
        self.budget_spec = None if self.budget is None else BudgetSpec.parse(self.budget)
        if self.budget_spec is not None and self.budget_spec.fraction is None:
            raise UsageError(f"prune --budget takes params=F or flops=F, not {self.budget}")
        self.fraction = 1.0 if self.keep is None else _fraction(self.keep, "--keep")
        self.overrides = [(p, _fraction(f, f"--keep-for {p}")) for p, f in pairs(self.keep_for, "--keep-for")]
        self.patterns = tuple(("--keep-for", p) for p, _ in self.overrides)
