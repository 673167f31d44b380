"""Which channels go first: filter magnitude, or reconstruction error on calibration Grams."""
from __future__ import annotations

import numpy as np

from .channels import ChannelGraph, Group, Layer

RIDGE = 1e-6


def as_matrix(layer: Layer, w: np.ndarray) -> np.ndarray:
    """The weight as (outputs × input features) in the order the input's Gram matrix uses."""
    if layer.kind == "conv":
        return w.reshape(w.shape[0], -1)
    return w.T if layer.in_axis == 0 else w


def from_matrix(layer: Layer, m: np.ndarray, shape: tuple) -> np.ndarray:
    return (m.T if layer.kind == "dense" and layer.in_axis == 0 else m).reshape(shape).astype(np.float32)


def magnitude(graph: ChannelGraph, group: Group) -> np.ndarray:
    """Per channel class: the L1 norm of its filters, summed over the group's producers."""
    index = {c[0]: i for i, c in enumerate(group.classes)}
    score = np.zeros(len(group.classes))
    for layer in group.producers:
        w = np.abs(graph.ctx.constant(layer.weight)).astype(np.float64)
        per_out = w.sum(axis=tuple(i for i in range(w.ndim) if i != layer.out_axis))
        for i, atom in enumerate(layer.out_atoms):
            score[index[graph.find(atom)]] += per_out[i]
    return score


def feature_atoms(layer: Layer, w: np.ndarray) -> list[int]:
    """The atom of each column of `as_matrix(layer, w)` (a conv's im2col columns are channel-major)."""
    block = int(np.prod(w.shape[2:])) if layer.kind == "conv" else 1
    return [a for a in layer.in_atoms for _ in range(block)]


def reconstruction_order(graph: ChannelGraph, group: Group, grams: dict) -> tuple[list[int], list[float]] | None:
    """He et al.'s selection, greedy: the channels in the order of removal, each the one that adds least to the
    consumers' summed relative output error on the calibration inputs, with that error after each removal; None
    when no consumer has a Gram matrix."""
    index = {c[0]: i for i, c in enumerate(group.classes)}
    n = len(group.classes)
    q = np.zeros((n, n))
    found = False
    for layer in graph.layers.values():
        if not layer.in_atoms or layer.name not in grams:
            continue
        w = graph.ctx.constant(layer.weight).astype(np.float64)
        m = as_matrix(layer, w)
        cls = np.array([index.get(graph.find(a), -1) for a in feature_atoms(layer, w)])
        cols = np.flatnonzero(cls >= 0)
        if not len(cols):
            continue
        found = True
        g = grams[layer.name][:-1, :-1]
        energy = max(float(np.einsum("ij,jk,ik->", m, g, m)), 1e-30)
        contrib = g[np.ix_(cols, cols)] * (m[:, cols].T @ m[:, cols]) / energy
        np.add.at(q, (cls[cols][:, None], cls[cols][None, :]), contrib)
    if not found:
        return None
    order, errors, total = [], [], 0.0
    cost = np.diag(q).copy()
    alive = np.ones(n, bool)
    for _ in range(n - 1):
        c = int(np.argmin(np.where(alive, cost, np.inf)))
        total += float(cost[c])
        alive[c] = False
        order.append(c)
        errors.append(total)
        cost += 2 * q[:, c]
    return order, errors


def magnitude_order(graph: ChannelGraph, group: Group) -> tuple[list[int], list[float]]:
    """The channels from the smallest filter L1 norm up, with the share of the group's norm removed after each."""
    score = magnitude(graph, group)
    order = np.argsort(score, kind="stable")[:len(score) - 1].tolist()
    share = np.cumsum(score[order]) / max(float(score.sum()), 1e-30)
    return order, share.tolist()






