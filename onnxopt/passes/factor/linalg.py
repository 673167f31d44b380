"""Low-rank factorization: W (m×n) ≈ U (m×k) · V (k×n), and the rank policies.

Truncated SVD from LAPACK (gesdd) when k is a large part of min(m, n); for a small k on a large
matrix a randomized range finder (Halko, Martinsson, Tropp 2011, two power iterations) gets the
same leading subspace in a fraction of the time. Singular values are split evenly:
U = U_k·√Σ_k, V = √Σ_k·V_kᵀ, so neither factor carries all the scale.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import UsageError

RANDOMIZED_MIN_DIM = 256  # below this LAPACK is fast anyway
RANDOMIZED_MAX_SHARE = 0.25  # randomized only when k ≤ 25% of min(m, n)


@dataclass(frozen=True)
class RankSpec:
    """A rank given as a fraction of min(m, n) (`0.6`) or as an integer (`32`)."""

    fraction: float | None = None
    integer: int | None = None

    @classmethod
    def parse(cls, text: str | float | int) -> "RankSpec":
        if isinstance(text, bool):
            raise UsageError(f"invalid rank {text!r}")
        if isinstance(text, int):
            text = str(text)
        elif isinstance(text, float):
            text = repr(text)
        s = str(text).strip()
        try:
            if any(ch in s for ch in ".eE"):
                f = float(s)
                if not (0.0 < f <= 1.0):
                    raise ValueError
                return cls(fraction=f)
            i = int(s)
            if i < 1:
                raise ValueError
            return cls(integer=i)
        except ValueError:
            raise UsageError(f"invalid rank '{s}': give a fraction in (0, 1] like 0.6 "
                             f"or an integer >= 1 like 32") from None

    def resolve(self, m: int, n: int) -> int:
        full = min(m, n)
        if self.fraction is not None:
            return max(1, min(full, round(self.fraction * full)))
        return min(full, self.integer)


def parse_energy(value: float) -> float:
    if not (0.0 < value <= 1.0):
        raise UsageError(f"invalid energy {value}: give a share of the squared singular values in (0, 1]")
    return value


def rank_for_energy(singular_values: np.ndarray, energy: float) -> int:
    """Smallest k whose leading σ² keep at least `energy` of Σσ²."""
    power = np.cumsum(np.asarray(singular_values, np.float64) ** 2)
    if power[-1] == 0:
        return 1
    return int(np.searchsorted(power / power[-1], energy - 1e-12) + 1)


def singular_values(w: np.ndarray) -> np.ndarray:
    return np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)


@dataclass
class Factors:
    u: np.ndarray  # m×k
    v: np.ndarray  # k×n
    error: float  # relative Frobenius error ‖W − UV‖ / ‖W‖
    method: str


def low_rank(w: np.ndarray, k: int, *, seed: int = 0) -> Factors:
    """Best rank-k factors of w (exact truncated SVD, or randomized when k is small against w)."""
    m, n = w.shape
    k = max(1, min(k, m, n))
    if min(m, n) >= RANDOMIZED_MIN_DIM and k <= RANDOMIZED_MAX_SHARE * min(m, n):
        u, s, vt, kept_power = _randomized_svd(w, k, seed=seed)
        method = "randomized"
    else:
        u, s_all, vt = np.linalg.svd(np.asarray(w, np.float64), full_matrices=False)
        u, s, vt = u[:, :k], s_all[:k], vt[:k]
        kept_power = float(np.sum(s**2))
        method = "svd"
    total = _squared_norm(w)
    # ‖W − Q·B_k‖² = ‖W‖² − Σ_kept σ² for both methods (orthogonal projections), no m×n product needed
    error = float(np.sqrt(max(total - kept_power, 0.0) / total)) if total > 0 else 0.0
    root = np.sqrt(s)
    return Factors(u=u * root, v=root[:, None] * vt, error=error, method=method)


def _randomized_svd(w, k, *, oversample=10, power_iters=2, seed=0):
    # float32 products halve the time of the m×n passes; the small l×n SVD is done in float64
    a = np.asarray(w, np.float32)
    m, n = a.shape
    width = min(k + oversample, m, n)
    omega = np.random.default_rng(seed).standard_normal((n, width), dtype=np.float32)
    q = _orthonormal_basis(a @ omega)
    for _ in range(power_iters):
        z = _orthonormal_basis(a.T @ q)
        q = _orthonormal_basis(a @ z)
    q, _ = np.linalg.qr(q)  # Householder for the basis that is kept: orthogonal to float32 precision
    b = (q.T @ a).astype(np.float64)
    ub, s, vt = np.linalg.svd(b, full_matrices=False)
    u = q.astype(np.float64) @ ub[:, :k]
    return u, s[:k], vt[:k], float(np.sum(s[:k] ** 2))


def _orthonormal_basis(y: np.ndarray) -> np.ndarray:
    """A basis of y's columns for the power iterations: Cholesky QR (Y·R⁻¹ with RᵀR = YᵀY in float64), two
    products instead of Householder QR's sweeps on a tall 25088 x 420 block. Householder QR when the Gram
    matrix is too ill-conditioned for Cholesky; the kept basis is always re-orthogonalized by Householder."""
    gram = y.T.astype(np.float64) @ y.astype(np.float64)
    try:
        upper = np.linalg.cholesky(gram).T
    except np.linalg.LinAlgError:
        return np.linalg.qr(y)[0]
    return y @ np.linalg.inv(upper).astype(y.dtype)  # R⁻¹ is small (width²); one GEMM in y's precision


def relative_error(w: np.ndarray, u: np.ndarray, v: np.ndarray) -> float:
    w = np.asarray(w, np.float64)
    norm = np.linalg.norm(w)
    return float(np.linalg.norm(w - u.astype(np.float64) @ v.astype(np.float64)) / norm) if norm else 0.0


def whitened_low_rank(w: np.ndarray, k: int, gram: np.ndarray) -> Factors:
    """Rank-k factors minimizing ‖X·W − X·U·V‖F for inputs X with Gram matrix G = XᵀX (SVD-LLM); see `spectrum`.
    The error reported is the relative output error on the calibration inputs."""
    return spectrum(w, gram).factors(k)


@dataclass
class Spectrum:
    """A full SVD of a layer, kept so that the factors and the error of any rank come without a second SVD
    (budgets try many ranks). Plain: W = P·diag(s)·Qᵀ. Whitened: Lᵀ·W = P·diag(s)·Qᵀ, and the factors are
    mapped back through L⁻ᵀ."""

    p: np.ndarray
    s: np.ndarray
    qt: np.ndarray
    lower: np.ndarray | None = None  # Cholesky factor of the Gram matrix (whitened), else None

    def tail_energy(self) -> np.ndarray:
        """d[k] = Σ_{j>k} s_j² / Σ s_j² for k = 0..len(s): the share of the layer's energy (with whitening,
        of its output energy on the calibration inputs) that rank k loses."""
        power = np.asarray(self.s, np.float64) ** 2
        total = float(power.sum())
        if total <= 0:
            return np.zeros(len(power) + 1)
        kept = np.concatenate([[0.0], np.cumsum(power)])
        return np.maximum(total - kept, 0.0) / total

    def factors(self, k: int) -> Factors:
        k = max(1, min(k, len(self.s)))
        root = np.sqrt(self.s[:k])
        u = self.p[:, :k] * root
        if self.lower is not None:
            u = np.linalg.solve(self.lower.T, u)
        error = float(np.sqrt(self.tail_energy()[k]))
        return Factors(u=u, v=root[:, None] * self.qt[:k], error=error,
                       method="svd" if self.lower is None else "whitened svd")


def spectrum(w: np.ndarray, gram: np.ndarray | None = None) -> Spectrum:
    """The SVD of w, or with a Gram matrix G = XᵀX of its inputs, of Lᵀ·w (G = L·Lᵀ, Cholesky): since
    ‖X·A‖F = ‖Lᵀ·A‖F, truncating that SVD gives the factors with the least output error on those inputs.
    A small ridge keeps L invertible when some inputs never vary (dead ReLUs, constant pixels)."""
    target, lower = np.asarray(w, np.float64), None
    if gram is not None:
        g = np.asarray(gram, np.float64)
        ridge = 1e-6 * max(float(np.trace(g)) / len(g), 1e-12)
        lower = np.linalg.cholesky(g + ridge * np.eye(len(g)))
        target = lower.T @ target
    p, s, qt = np.linalg.svd(target, full_matrices=False)
    return Spectrum(p, s, qt, lower)


def _squared_norm(w: np.ndarray) -> float:
    """Σ w², accumulated in float64 one row block at a time (no float64 copy of a large matrix)."""
    flat = np.asarray(w).reshape(len(w), -1)
    step = max(1, (1 << 22) // max(flat.shape[1], 1))
    return float(sum(np.einsum("ij,ij->", b, b, dtype=np.float64) for b in
                     (flat[i:i + step].astype(np.float64) for i in range(0, len(flat), step))))
