"""Budgets: the rank of every factored layer chosen under one global parameter or FLOP budget (`--budget`).

The rule. A budgeted layer (selected, factorable, its rank not pinned by --rank-for) takes a rank
k = 1..K (K the largest k with k(m+n) < m·n) or stays dense. Its costs: params k(m+n) + bias, dense m·n + bias;
FLOPs per sample 2·rows·k(m+n), dense 2·rows·m·n (rows: tokens per sample for a MatMul on 3-D input). Its error
is normalised by its own energy, d(k) = Σ_{j>k} σ_j² / Σ_j σ_j², with σ the singular values of W, or with
calibration data those of Lᵀ·W (XᵀX = L·Lᵀ), for which d(k) is exactly the share of the layer's output energy lost
on the calibration inputs; d(dense) = 0. Layers of any size and scale are then comparable. The allocation
minimises Σ −log(1 − d) over the layers (≈ Σ d for small errors; the layers' kept shares multiply along the
network, and a layer that loses nearly all its energy costs without bound, where a plain sum would let a budget
wreck one layer: on the tiny ViT at 20% of the params, 0.46 accuracy with Σ d, 0.67 with this) subject to
Σ cost ≤ fraction × Σ dense cost (pinned layers are charged their rank's cost):
  1. Lagrangian: each layer's choices reduced to the lower convex hull of its (cost, loss) points; hull steps
     taken across all layers in decreasing order of loss removed per unit cost, while they fit (this is the
     exact optimum at every budget such a step meets exactly);
  2. fill: while a single step (k → k+1, or k → dense) fits in what is left, take the one removing most loss
     per unit cost.
The budget is never exceeded; what is left at the end is smaller than every layer's next step (or no step
lowers the loss any more).
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import numpy as np

from ..budget import unreachable


@dataclass
class Layer:
    """What the allocation needs of one layer: its sizes and its error at every rank."""

    name: str
    m: int
    n: int
    bias: int  # parameters every choice keeps (Gemm's C)
    rows: int  # rows per sample pushed through the weight
    tail: np.ndarray  # d(k) for k = 0..min(m, n)
    pinned: int | None = None  # rank from --rank-for; None when the allocation chooses

    @property
    def max_rank(self) -> int:
        """Largest rank that saves something (0: none does, the layer stays dense)."""
        return min((self.m * self.n - 1) // (self.m + self.n), self.m, self.n)

    def cost(self, kind: str, k: int | None) -> int:
        width = self.m * self.n if k is None else k * (self.m + self.n)
        return width + self.bias if kind == "params" else 2 * self.rows * width

    def error(self, k: int | None) -> float:
        """d(k), the normalised error (share of the layer's energy lost)."""
        return 0.0 if k is None else float(self.tail[min(k, len(self.tail) - 1)])

    def loss(self, k: int | None) -> float:
        """What the allocation minimises the sum of: −log(1 − d(k)), ≈ d(k) for small errors."""
        return -math.log1p(-min(self.error(k), 1 - 1e-12))


@dataclass
class Allocation:
    kind: str
    fraction: float
    ranks: dict[str, int | None]  # None: kept dense
    layers: list[Layer] = field(repr=False, default_factory=list)

    @property
    def dense(self) -> int:
        return sum(x.cost(self.kind, None) for x in self.layers)

    @property
    def allowed(self) -> int:
        return math.floor(self.fraction * self.dense)

    @property
    def used(self) -> int:
        return sum(x.cost(self.kind, self.ranks[x.name]) for x in self.layers)

    def to_dict(self) -> dict:
        rows = [{"name": x.name, "rank": self.ranks[x.name], "pinned": x.pinned is not None,
                 "max_rank": x.max_rank, "before": x.cost(self.kind, None),
                 "after": x.cost(self.kind, self.ranks[x.name]), "error": x.error(self.ranks[x.name])}
                for x in self.layers]
        return {"kind": self.kind, "fraction": self.fraction, "dense": self.dense, "allowed": self.allowed,
                "used": self.used, "layers": rows}


def minimum_cost(layers: list[Layer], kind: str) -> int:
    """The cheapest the layers can be: pinned ranks as given, rank 1 elsewhere (dense where nothing saves)."""
    return sum(x.cost(kind, _fixed_choice(x)) for x in layers)


def smallest_fraction(layers: list[Layer], kind: str) -> float:
    """The smallest budget fraction `allocate` accepts (to 1/1000, rounded up; 1 when there is nothing to
    allocate)."""
    dense = sum(x.cost(kind, None) for x in layers)
    return math.ceil(minimum_cost(layers, kind) / dense * 1000) / 1000 if dense else 1.0


def _fixed_choice(layer: Layer) -> int | None:
    if layer.pinned is not None:
        return layer.pinned if layer.pinned <= layer.max_rank else None  # a rank that saves nothing stays dense
    return 1 if layer.max_rank >= 1 else None


def allocate(layers: list[Layer], kind: str, fraction: float) -> Allocation:
    """Ranks for `layers` within `fraction` of their dense cost (the rule in the module docstring)."""
    result = Allocation(kind, fraction, {x.name: _fixed_choice(x) for x in layers}, layers)
    free = [x for x in layers if x.pinned is None and x.max_rank >= 1]
    left = result.allowed - minimum_cost(layers, kind)
    if left < 0:
        pinned = ", the pinned ranks kept" if len(free) < len(layers) else ""
        raise unreachable(kind, fraction, smallest_fraction(layers, kind), f"rank 1 on every budgeted layer{pinned}")
    left = _hull_phase(free, kind, result.ranks, left)
    _fill_phase(free, kind, result.ranks, left)
    return result


def _hull(layer: Layer, kind: str) -> list[tuple[int | None, int, float]]:
    """(choice, cost, error) on the lower convex hull of the layer's choices, from rank 1 to dense."""
    hull: list[tuple[int | None, int, float]] = []
    for k in list(range(1, layer.max_rank + 1)) + [None]:
        point = (k, layer.cost(kind, k), layer.loss(k))
        while len(hull) >= 2 and _rate(hull[-2], hull[-1]) <= _rate(hull[-1], point):
            hull.pop()
        hull.append(point)
    return hull


def _rate(a, b) -> float:
    """Error removed per unit of cost going from choice a to the dearer choice b."""
    return (a[2] - b[2]) / max(b[1] - a[1], 1)


def _hull_phase(free: list[Layer], kind: str, ranks: dict, left: int) -> int:
    hulls = [_hull(x, kind) for x in free]
    heap = [(-_rate(h[0], h[1]), i, 1) for i, h in enumerate(hulls) if len(h) > 1]
    heapq.heapify(heap)
    while heap:
        neg_rate, i, j = heapq.heappop(heap)
        step = hulls[i][j][1] - hulls[i][j - 1][1]
        if step > left or neg_rate >= 0:
            break
        left -= step
        ranks[free[i].name] = hulls[i][j][0]
        if j + 1 < len(hulls[i]):
            heapq.heappush(heap, (-_rate(hulls[i][j], hulls[i][j + 1]), i, j + 1))
    return left


def _fill_phase(free: list[Layer], kind: str, ranks: dict, left: int) -> None:
    while True:
        best = None
        for x in free:
            k = ranks[x.name]
            if k is None:
                continue
            here = (k, x.cost(kind, k), x.loss(k))
            for choice in ([k + 1] if k < x.max_rank else []) + [None]:
                there = (choice, x.cost(kind, choice), x.loss(choice))
                rate = _rate(here, there)
                if there[1] - here[1] <= left and rate > 0 and (best is None or rate > best[0]):
                    best = (rate, x, choice, there[1] - here[1])
        if best is None:
            return
        _, x, choice, step = best
        ranks[x.name] = choice
        left -= step


def search(evaluate, lowest: float, max_drop: float, progress=None, steps: int = 7) -> list[dict]:
    """The smallest fraction in [lowest, 1] whose model loses at most `max_drop`, by bisection (the loss is
    taken to fall as the budget grows; every candidate is measured, and the best one that passed is kept).
    `evaluate(fraction) -> drop`. Fraction 1 keeps every layer dense and passes by definition. Returns the
    candidates measured, in order: [{"fraction", "drop", "passed"}]."""
    tried: list[dict] = []
    lo, hi = lowest, 1.0
    fractions = range(steps + 1)
    for i in progress(fractions, "budget search: candidates") if progress else fractions:
        fraction = lowest if i == 0 else round((lo + hi) / 2, 6)
        drop = evaluate(fraction)
        tried.append({"fraction": fraction, "drop": drop, "passed": drop <= max_drop})
        if drop <= max_drop:
            if i == 0:
                break
            hi = fraction
        else:
            lo = fraction
    return tried


def collect(model, rules, selection, whitening: dict | None = None, shapes: dict | None = None
            ) -> tuple[list[Layer], dict]:
    """The budgeted layers of `model` (those factor's `rules` take and `selection` selects, in graph order)
    and the SVD of each layer whose rank the allocation chooses (pinned ones keep --rank-for's)."""
    from ...graph.nodes import op_key
    from ...graph.selection import layer_paths
    from ..rules import verdicts_with_bodies
    from . import linalg

    layers, spectra = [], {}
    for ctx, node, name, reason, _ in verdicts_with_bodies(model, rules, selection, shapes):
        if reason:
            continue
        rule = rules[op_key(node)]
        w = rule.weight(node, ctx)
        pinned = rule.pinned_rank(ctx.name_of(node), w, layer_paths(node))
        if pinned is None:
            spectra[name] = linalg.spectrum(w, (whitening or {}).get(name))
            tail = spectra[name].tail_energy()
        else:
            tail = np.zeros(min(w.shape) + 1)
        layers.append(Layer(name, *w.shape, bias=rule.bias_size(node, ctx), rows=rule.rows(node, ctx), tail=tail,
                            pinned=pinned))
    return layers, spectra
