"""How many channels each group keeps: --keep fractions, per-layer overrides, or a params/FLOPs --budget."""
from __future__ import annotations

import math

from ...graph.selection import Selection, layer_paths, matches
from ..budget import unreachable
from .channels import ChannelGraph, Group
from .ranking import feature_atoms, magnitude_order, reconstruction_order


# ---- --budget: channel counts per group under one params / FLOPs budget ----------------------------------------
class Costs:
    """Params or FLOPs of the layers as channels are removed: a layer's cost is (kept outputs) × (kept input
    features) [× output positions], so removing a channel saves in every layer that makes or reads it."""

    def __init__(self, graph: ChannelGraph, kind: str):
        self.layers = list(graph.layers.values())
        self.out = []
        self.inp = []
        self.scale = []
        self.touch: dict[int, list[tuple[int, int, int]]] = {}  # root -> (layer, outputs it has, inputs it has)
        for j, layer in enumerate(self.layers):
            w = graph.ctx.constant(layer.weight)
            outs = w.shape[layer.out_axis]
            feats = int(w.size // outs)
            self.out.append(outs)
            self.inp.append(feats)
            self.scale.append(layer.pixels if kind == "flops" else 1)
            counts: dict[int, list[int]] = {}
            for a in layer.out_atoms or []:
                counts.setdefault(graph.find(a), [0, 0])[0] += 1
            for a in feature_atoms(layer, w) if layer.in_atoms is not None else []:
                counts.setdefault(graph.find(a), [0, 0])[1] += 1
            for root, (o, i) in counts.items():
                self.touch.setdefault(root, []).append((j, o, i))

    def total(self) -> int:
        return sum(o * i * s for o, i, s in zip(self.out, self.inp, self.scale))

    def saving(self, root: int) -> int:
        """What removing the channel `root` saves: its row in the layers making it, its columns in the readers."""
        return sum((o * self.inp[j] + i * self.out[j] - o * i) * self.scale[j] for j, o, i in self.touch.get(root, []))

    def remove(self, root: int) -> None:
        for j, o, i in self.touch.get(root, []):
            self.out[j] -= o
            self.inp[j] -= i


def allocate(graph: ChannelGraph, groups: list[Group], orders: dict, fixed: dict[int, int],
             budget: tuple[str, float]) -> dict[int, int]:
    """Channels per group so that the prunable layers cost at most `fraction` of their cost now: greedily remove
    the channel with the least added loss per unit of cost saved, the loss of a group being −log(1 − d) with d
    its error after the removals (share of filter norm removed, or with calibration the relative output error);
    groups given by --keep-for are removed to their count first."""
    kind, fraction = budget
    costs = Costs(graph, kind)
    dense = costs.total()
    removed = {i: 0 for i in orders}
    for i, k in fixed.items():
        for c in orders[i][0][:len(groups[i].classes) - k]:
            costs.remove(groups[i].classes[c][0])
        removed[i] = len(groups[i].classes) - k
    free = [i for i in orders if i not in fixed]

    def loss(i, r):
        return 0.0 if r == 0 else -math.log1p(-min(orders[i][1][r - 1], 1 - 1e-12))

    allowed = fraction * dense
    while costs.total() > allowed:
        best, best_rate = None, math.inf
        for i in free:
            r = removed[i]
            if r >= len(orders[i][0]):
                continue
            saved = costs.saving(groups[i].classes[orders[i][0][r]][0])
            if saved > 0 and (rate := (loss(i, r + 1) - loss(i, r)) / saved) < best_rate:
                best, best_rate = i, rate
        if best is None:
            raise unreachable(kind, fraction, costs.total() / dense, "one channel per group")
        costs.remove(groups[best].classes[orders[best][0][removed[best]]][0])
        removed[best] += 1
    return {i: len(groups[i].classes) - r for i, r in removed.items()}


def uniform_allocation(graph: ChannelGraph, groups: list[Group], orders: dict, fixed: dict[int, int],
                       budget: tuple[str, float]) -> dict[int, int]:
    """The largest single keep fraction (to 1/1000) whose channel counts meet the budget: without calibration
    data, the filter norm ranks channels within a layer but says nothing about which layer matters more (on the
    sample CNN at flops=0.25, a norm-share allocation reached 0.88-0.94, one fraction for all 0.97)."""
    kind, fraction = budget

    def cost(f):
        costs = Costs(graph, kind)
        dense = costs.total()
        counts = {i: fixed.get(i, max(1, round(f * len(groups[i].classes)))) for i in orders}
        for i, k in counts.items():
            for c in orders[i][0][:len(groups[i].classes) - k]:
                costs.remove(groups[i].classes[c][0])
        return costs.total(), dense, counts

    low, high = 0.0, 1.0
    used, dense, counts = cost(low)
    if used > fraction * dense:
        raise unreachable(kind, fraction, used / dense, "one channel per group")
    for _ in range(10):
        middle = (low + high) / 2
        if cost(middle)[0] <= fraction * dense:
            low = middle
        else:
            high = middle
    return cost(low)[2]


def budget_summary(graph: ChannelGraph, groups: list[Group], budget: tuple[str, float], removed: set[int]) -> dict:
    """The report's budget section: per group the channels kept and its error; the cost before and after."""
    kind, fraction = budget
    costs = Costs(graph, kind)
    dense = costs.total()
    for root in removed:
        costs.remove(root)
    rows = [{"name": g.producers[0].name, "rank": len(g.keep), "max_rank": len(g.classes), "pinned": False,
             "before": len(g.classes), "after": len(g.keep), "error": g.error or 0.0}
            for g in groups if not g.pinned and len(g.classes) > 1]
    return {"budget": f"{kind}={fraction:g}", "kind": kind, "fraction": fraction, "what": "channels",
            "dense": dense, "allowed": math.floor(fraction * dense), "used": costs.total(), "layers": rows,
            "search": None}


def keep_fraction(group: Group, keep: float, keep_for: list[tuple[str, float]]) -> float:
    for layer in group.producers:
        paths = layer_paths(layer.node)
        hit = next((f for p, f in keep_for if matches(layer.name, p, paths)), None)
        if hit is not None:
            return hit
    return keep


def choose(graph: ChannelGraph, groups: list[Group], keep: float, keep_for, selection: Selection,
           grams: dict | None, budget: tuple[str, float] | None = None) -> set[int]:
    """Each group's kept channels (group.keep): round(fraction × channels), or under `budget` (kind, fraction) the
    counts `allocate` chooses; returns the class roots removed."""
    orders = {}
    for i, group in enumerate(groups):
        declined = next((r for layer in group.producers if (r := selection.decline_reason(layer.node, layer.name))),
                        None)
        group.pinned = group.pinned or declined
        if not group.pinned and len(group.classes) > 1:
            orders[i] = (reconstruction_order(graph, group, grams) if grams else None) or \
                magnitude_order(graph, group)
    fixed = {i: max(1, round(keep_fraction(g, keep, keep_for) * len(g.classes))) for i, g in enumerate(groups)
             if i in orders and (budget is None or overridden(g, keep_for))}
    if budget and not grams:  # no comparable loss across layers without data: one fraction for all (see allocate)
        counts = uniform_allocation(graph, groups, orders, fixed, budget)
    else:
        counts = allocate(graph, groups, orders, fixed, budget) if budget else fixed
    removed: set[int] = set()
    for i, group in enumerate(groups):
        k = min(counts.get(i, len(group.classes)), len(group.classes))
        gone = orders[i][0][:len(group.classes) - k] if i in orders else []
        group.keep = sorted(set(range(len(group.classes))) - set(gone))
        group.error = orders[i][1][len(gone) - 1] if gone else 0.0
        removed |= {group.classes[c][0] for c in gone}
    return removed


def overridden(group: Group, keep_for) -> bool:
    return any(matches(layer.name, p, layer_paths(layer.node)) for layer in group.producers for p, _ in keep_for)
