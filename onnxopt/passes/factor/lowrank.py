"""What every factoring rule shares (dense layers in dense.py, convs in conv.py): the weight as a matrix
W (m×n) of Y = X·W, the rank choice (--rank, --energy, --rank-for, a budget's allocation, a projection
function) and the factors (SVD, randomized SVD, whitened SVD on calibration data, a budget's kept spectrum).
"""
from __future__ import annotations

import numpy as np
import onnx

from ...errors import OnnxoptError
from ...graph.context import GraphContext
from ...graph.selection import matches
from ..rules import Declined, Rule
from . import linalg
from .options import FactorOptions


class LowRankRule(Rule):
    """The weight as a matrix, the rank choice and the factors.
    `whitening` maps a layer name to the Gram matrix XᵀX of its input (calibration), if any; `ranks` to the
    rank a budget allocated it (None: keep it dense), `spectra` to its SVD, computed once for the budget."""

    weight_input = 1

    def __init__(self, options: FactorOptions, whitening: dict[str, np.ndarray] | None = None,
                 ranks: dict[str, int | None] | None = None, spectra: dict[str, linalg.Spectrum] | None = None):
        self.options = options
        self.whitening = whitening or {}
        self.ranks = ranks
        self.spectra = spectra or {}

    def weight(self, node: onnx.NodeProto, ctx: GraphContext) -> np.ndarray:
        """W (m×n) of Y = X·W, once `check` has passed."""
        return ctx.constant(node.input[self.weight_input])

    def bias_size(self, node: onnx.NodeProto, ctx: GraphContext) -> int:
        """Parameters the layer keeps whatever its rank (a constant bias)."""
        return 0

    def rows(self, node: onnx.NodeProto, ctx: GraphContext) -> int:
        """Rows per sample the weight multiplies (tokens of a MatMul on 3-D input)."""
        return 1

    def calibration_input(self, node: onnx.NodeProto) -> str:
        """The tensor whose Gram matrix data-aware factors need."""
        return node.input[0]

    def calibration_gram(self, node: onnx.NodeProto, x: np.ndarray, constant) -> np.ndarray:
        """XᵀX of one batch of that tensor, X its values as rows of the m features the weight multiplies
        (`constant(name)` looks up the graph's constants)."""
        rows = self.calibration_rows(node, x).astype(np.float64)
        return rows.T @ rows

    def calibration_rows(self, node: onnx.NodeProto, x: np.ndarray) -> np.ndarray:
        return x.reshape(-1, x.shape[-1])

    def pinned_rank(self, name: str, w: np.ndarray, paths: tuple[str, ...] = ()) -> int | None:
        """The rank a --rank-for pattern gives the layer (name, module paths), if one matches."""
        spec = next((s for p, s in self.options.rank_overrides if matches(name, p, paths)), None)
        return None if spec is None else spec.resolve(*w.shape)

    def choose_rank(self, name: str, w: np.ndarray, paths: tuple[str, ...] = (), key: str | None = None) -> int:
        """`name` as patterns match it; `key` (default `name`): the layer's id across bodies (ctx.layer_id), which
        a budget's ranks and spectra are keyed by."""
        key = key or name
        opts = self.options
        m, n = w.shape
        pinned = self.pinned_rank(name, w, paths)
        if pinned is not None:
            return pinned
        if self.ranks is not None:
            if self.ranks.get(key) is None:
                raise Declined("kept dense by --budget")
            return self.ranks[key]
        if opts.projection_function is not None:
            k = opts.projection_function(w)
            if isinstance(k, (float, np.floating)) and 0 < k <= 1:
                return linalg.RankSpec(fraction=float(k)).resolve(m, n)
            if not isinstance(k, (int, np.integer)) or k < 1:
                raise OnnxoptError(f"{name}: projection function returned {k!r}, expected an integer rank >= 1")
            return min(int(k), m, n)
        if opts.energy is not None:
            return linalg.rank_for_energy(linalg.singular_values(w), opts.energy)
        if opts.rank_spec is None:
            raise Declined("no --rank-for pattern matches it and no --rank was given")
        return opts.rank_spec.resolve(m, n)

    def factors(self, name: str, w: np.ndarray, k: int, key: str | None = None) -> linalg.Factors:
        opts = self.options
        key = key or name
        if opts.factor_function is not None:
            u, v = opts.factor_function(w, k)
            u, v = np.asarray(u), np.asarray(v)
            if u.shape != (w.shape[0], k) or v.shape != (k, w.shape[1]):
                raise OnnxoptError(f"{name}: factor function returned shapes {u.shape} and {v.shape}, "
                                   f"expected {(w.shape[0], k)} and {(k, w.shape[1])}")
            return linalg.Factors(u, v, linalg.relative_error(w, u, v), "factor function")
        if key in self.spectra:
            return self.spectra[key].factors(k)
        gram = self.whitening.get(name)
        if gram is not None:
            return linalg.whitened_low_rank(w, k, gram)
        return linalg.low_rank(w, k, seed=opts.seed)


def large_error_warning(layer) -> list[str]:
    """A warning when a factored layer keeps little of what it computed (rel.err above report.LARGE_ERROR)."""
    from ...report import LARGE_ERROR

    if layer.error is None or layer.error <= LARGE_ERROR:
        return []
    return [f"{layer.name}: rel.err {layer.error:.2f} at rank {layer.rank} (above {LARGE_ERROR}): the layer keeps "
            f"little of its output; raise its rank (--rank-for) or use --budget"]
