"""`factor`'s options: rank, energy, conv mode, budget, per-layer ranks, user functions."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...errors import UsageError
from ...options import choice, int_pair, load_function, option, pairs

CONV_MODES = ("auto", "channel", "tucker", "spatial")


def _tucker_ranks(text: str) -> tuple[int, int]:
    """`R1xR2`: a conv's Tucker-2 ranks (input, output channels)."""
    pair = int_pair(text)
    if pair is None:
        raise UsageError(f"invalid Tucker ranks '{text}' for --rank-for: expected R1xR2 like 16x32")
    return pair


@dataclass
class FactorOptions:
    """`factor`: how each dense layer's rank is chosen and how its factors are computed."""

    rank: Any = option(help="Rank per layer: a fraction of min(m,n) written with a '.' (0.6: 60% of min(m,n); "
                            "a square layer then keeps 1.2x its params, a 784x400 one 91%: see the report's params) "
                            "or an integer (32; '1' is rank 1, '1.0' full rank).", metavar="R", kind=str)
    budget: str | None = option(help="Choose every layer's rank (or keep it dense) so that the selected layers "
                                     "use at most fraction F of their dense params (or FLOPs per sample), losing "
                                     "as little as possible; KIND=auto: the smallest budget that passes --max-drop "
                                     "on --data.", metavar="params=F|flops=F|KIND=auto")
    energy: float | None = option(help="Smallest rank keeping share E of the sum of squared singular values.",
                                  metavar="E", kind=float)
    rank_for: tuple = option(help="Per-layer rank; first match wins (repeatable).", metavar="PATTERN=R", repeat=True)
    projection_fn: Any = option(help="W (m x n numpy array) -> rank k.", metavar="MODULE:FUNCTION", code=True)
    factor_fn: Any = option(help="(W, k) -> (U, V), replacing the SVD.", metavar="MODULE:FUNCTION", code=True)
    conv_mode: str = option("auto", "How convs are factored: channel (kxk conv to k channels, then 1x1), tucker "
                                    "(1x1, kxk core, 1x1), spatial (kx1 then 1xk), or auto: per layer the one with "
                                    "the lowest weight error at the channel mode's size.",
                            metavar="auto|channel|tucker|spatial")
    allow_growth: bool = option(False, "Factor even layers where k(m+n) >= m*n (e.g. full-rank checks).")
    seed: int = option(0, "Seed of the randomized SVD.", cli=False)

    def __post_init__(self):
        from ..budget import BudgetSpec
        from . import linalg  # numpy: imported when a command runs, not for `onnxopt --help`

        if (self.rank is None and self.energy is None and self.projection_fn is None and not self.rank_for
                and self.budget is None):
            raise UsageError("give a rank: --rank 0.6, --rank 32, --energy 0.95, --budget params=0.5 or "
                             "--projection-fn")
        if self.rank is not None and self.energy is not None:
            raise UsageError("--rank and --energy exclude each other")
        self.budget_spec = None
        if self.budget is not None:
            given = [flag for flag, v in (("--rank", self.rank), ("--energy", self.energy),
                                          ("--projection-fn", self.projection_fn)) if v is not None]
            given += ["--allow-growth"] if self.allow_growth else []
            if given:
                raise UsageError(f"--budget chooses the ranks itself: drop {' and '.join(given)} (--rank-for pins "
                                 "single layers)")
            self.budget_spec = BudgetSpec.parse(self.budget)
        self.rank_spec = linalg.RankSpec.parse(self.rank) if self.rank is not None else None
        if self.energy is not None:
            linalg.parse_energy(self.energy)
        choice(self.conv_mode, CONV_MODES, "--conv-mode")
        given = pairs(self.rank_for, "--rank-for")
        self.rank_overrides = [(p, linalg.RankSpec.parse(r)) for p, r in given if "x" not in str(r)]
        self.tucker_overrides = [(p, _tucker_ranks(r)) for p, r in given if "x" in str(r)]
        self.projection_function = load_function(self.projection_fn, "--projection-fn")
        self.patterns = tuple(("--rank-for", p) for p, _ in self.rank_overrides + self.tucker_overrides)
        self.factor_function = load_function(self.factor_fn, "--factor-fn")
