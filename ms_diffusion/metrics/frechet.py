"""Fréchet distance between Gaussians fitted to feature sets (FID when the features are Inception's).

    d² = |mu1 - mu2|² + tr(S1) + tr(S2) - 2 tr( (S1 S2)^(1/2) )

pytorch-fid computes ``sqrtm(S1 @ S2)`` with scipy (a Schur decomposition of a non-symmetric
matrix), discards a small imaginary part, and when the result is not finite (a singular product)
retries with ``eps`` added to both diagonals. Here, numpy only, the trace term comes from a
symmetric eigenproblem instead: S1 S2 = R (R S2 R) R^-1 with R = S1^(1/2) (so the eigenvalues of
S1 S2 are those of the symmetric PSD matrix R S2 R, also when S1 is singular), hence

    tr (S1 S2)^(1/2) = sum_i sqrt(max(lambda_i(R S2 R), 0)).

``R`` comes from ``eigh(S1)`` with negative round-off eigenvalues clipped to 0. This never returns
complex numbers and stays exact for singular and near-singular covariances (N <= D, collinear
features), the case pytorch-fid handles by retrying with ``eps`` added to both diagonals; that
offset changes the answer by O(sqrt(eps)) per null direction, so here it is applied only when
asked (``eps > 0``, reported in the result). Matrices with clearly negative eigenvalues (below
``-1e-6`` times the largest) are not covariances and raise a ValueError.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np

__all__ = ["GaussianStats", "gaussian_stats", "sqrtm_psd", "trace_sqrt_product", "frechet_distance",
           "frechet_distance_from_features", "bootstrap_frechet_distance", "paired_bootstrap_distances",
           "bootstrap_ratios", "paired_bootstrap_ratios", "FrechetResult", "TooFewSamplesError"]

_NEG_TOL = 1e-6


class TooFewSamplesError(ValueError):
    """Too few feature vectors to estimate the covariance the metric needs."""


@dataclass(frozen=True)
class GaussianStats:
    """Mean (D,) and covariance (D, D), float64, of ``count`` feature vectors."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int


@dataclass(frozen=True)
class FrechetResult:
    """The distance, and whether ``eps`` was added to the covariances' diagonals."""

    value: float
    regularised: bool
    eps: float


def _as_features(features: np.ndarray, what: str = "features") -> np.ndarray:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array (N, D), got shape {f.shape}")
    if not np.all(np.isfinite(f)):
        raise ValueError(f"{what} contain NaN or inf values")
    return f


def gaussian_stats(features: np.ndarray, *, allow_singular: bool = False) -> GaussianStats:
    """Mean and unbiased covariance (``np.cov``, ddof=1) of ``features`` (N, D).

    Needs N >= 2; unless ``allow_singular``, also N > D (fewer vectors give a rank-deficient
    covariance and a distance dominated by estimation error).
    """
    f = _as_features(features)
    n, d = f.shape
    if n < 2 or (n <= d and not allow_singular):
        need = 2 if allow_singular else d + 1
        raise TooFewSamplesError(f"{n} sample(s) are too few for the covariance of {d}-dimensional features: need at "
                                 f"least {need} (more is better: the distance is biased upwards at small N)")
    mu = f.mean(axis=0)
    centred = f - mu
    sigma = centred.T @ centred / (n - 1)
    return GaussianStats(mu=mu, sigma=(sigma + sigma.T) * 0.5, count=n)


def _check_cov(sigma: np.ndarray, d: int, what: str) -> np.ndarray:
    s = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if s.shape != (d, d):
        raise ValueError(f"{what} must have shape ({d}, {d}), got {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{what} contains NaN or inf values")
    return (s + s.T) * 0.5


def sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Principal square root of a symmetric positive semi-definite matrix (D, D) via ``eigh``.

    Eigenvalues below zero (round-off) are clipped to 0; the result is symmetric PSD.
    """
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {a.shape}")
    w, v = np.linalg.eigh((a + a.T) * 0.5)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr (s1 s2)^(1/2) for symmetric PSD s1, s2 (ValueError if either is clearly not PSD)."""
    w, v = np.linalg.eigh(s1)
    if w.min() < -_NEG_TOL * max(abs(w).max(), 1e-300):
        raise ValueError(f"sigma1 is not positive semi-definite (eigenvalue {w.min():.3g}); is it a covariance?")
    r = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = r @ s2 @ r
    lam = np.linalg.eigvalsh((m + m.T) * 0.5)
    if lam.min() < -_NEG_TOL * max(abs(lam).max(), 1e-300):
        raise ValueError(f"sigma2 is not positive semi-definite (sigma1^1/2 sigma2 sigma1^1/2 has eigenvalue "
                         f"{lam.min():.3g}); is it a covariance?")
    # eigenvalues at round-off level are zeros of a singular product: their square roots (~1e-7
    # each) would otherwise add up to a visible error
    lam = np.where(lam > np.finfo(np.float64).eps * len(lam) * max(lam.max(), 0.0), lam, 0.0)
    return float(np.sum(np.sqrt(lam)))


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr( (sigma1 @ sigma2)^(1/2) ) for symmetric PSD (D, D) matrices (see the module docstring)."""
    s1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    return _trace_sqrt_product(_check_cov(s1, s1.shape[0], "sigma1"), _check_cov(sigma2, s1.shape[0], "sigma2"))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 0.0) -> FrechetResult:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2): means (D,), covariances (D, D).

    Returns a ``FrechetResult`` (value >= 0; round-off below 0 is clipped). ``eps`` > 0 adds
    ``eps * I`` to both covariances first (pytorch-fid's remedy for singular products, not needed
    here; ``result.regularised`` records it).
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"means must be vectors of one length, got {mu1.shape} and {mu2.shape}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    d = mu1.shape[0]
    s1, s2 = _check_cov(sigma1, d, "sigma1"), _check_cov(sigma2, d, "sigma2")
    if eps > 0:
        s1, s2 = s1 + np.eye(d) * eps, s2 + np.eye(d) * eps
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * _trace_sqrt_product(s1, s2))
    return FrechetResult(value=max(value, 0.0), regularised=eps > 0, eps=float(eps))


def frechet_distance_from_features(features: np.ndarray, reference: GaussianStats, *,
                                   allow_singular: bool = False) -> FrechetResult:
    """Fréchet distance between the Gaussian fitted to ``features`` (N, D) and ``reference`` statistics."""
    stats = gaussian_stats(features, allow_singular=allow_singular)
    if stats.mu.shape != reference.mu.shape:
        raise ValueError(f"features have dimension {stats.mu.shape[0]} but the reference statistics "
                         f"{reference.mu.shape[0]}; were they made with another feature extractor?")
    return frechet_distance(stats.mu, stats.sigma, reference.mu, reference.sigma)


def paired_bootstrap_distances(features: Sequence[np.ndarray], reference: GaussianStats, rounds: int = 20,
                               seed: int = 0, allow_singular: bool = False) -> np.ndarray:
    """(rounds, K) distances of K feature sets, each (N, D), under resampling with replacement.

    Each round draws one set of N indices and applies it to every set: when row i of every set
    comes from the same noise (several samplers or checkpoints run from one seed), the noise the
    sets share moves all of a round's distances together. With one set this is the ordinary
    bootstrap of its distance.
    """
    sets = [_as_features(f) for f in features]
    n = len(sets[0])
    if any(len(f) != n for f in sets):
        raise ValueError(f"paired bootstrap needs the same number of images in every set, got {[len(f) for f in sets]}")
    if rounds < 2:
        raise ValueError(f"bootstrap needs at least 2 rounds, got {rounds}")
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(int(rounds)):
        idx = rng.integers(0, n, n)
        rows.append([frechet_distance_from_features(f[idx], reference, allow_singular=allow_singular).value
                     for f in sets])
    return np.array(rows)


def bootstrap_frechet_distance(features: np.ndarray, reference: GaussianStats, rounds: int = 20, seed: int = 0,
                               allow_singular: bool = False) -> Tuple[float, np.ndarray]:
    """Standard deviation of the distance under resampling ``features`` (N, D) with replacement.

    Returns (std, the ``rounds`` bootstrap values). It measures the noise from the finite sample
    set only (the reference statistics are held fixed); compare two models' distances against it.
    """
    values = paired_bootstrap_distances([features], reference, rounds, seed, allow_singular)[:, 0]
    return float(values.std(ddof=1)), values


def bootstrap_ratios(distances: Sequence[float], resampled: np.ndarray, base: int = 0) -> List[Tuple[float, float]]:
    """(d_k / d_base, its bootstrap standard deviation) for each set k, from the sets' distances (K,)
    and their ``paired_bootstrap_distances`` (rounds, K)."""
    full = np.asarray(distances, dtype=np.float64)
    if not 0 <= base < len(full):
        raise ValueError(f"base must index one of the {len(full)} feature sets, got {base}")
    ratios = resampled / resampled[:, base:base + 1]
    return [(float(full[k] / full[base]), float(ratios[:, k].std(ddof=1))) for k in range(len(full))]


def paired_bootstrap_ratios(features: Sequence[np.ndarray], reference: GaussianStats, base: int = 0,
                            rounds: int = 20, seed: int = 0) -> List[Tuple[float, float]]:
    """(FD_k / FD_base, its bootstrap standard deviation) for each feature set k (N, D).

    Row i of every set comes from the same noise; the resampling is shared
    (``paired_bootstrap_distances``), so the noise the sets share cancels in the ratio: its spread
    is what separates the sets, much smaller than either distance's own bootstrap spread.
    """
    if not 0 <= base < len(features):
        raise ValueError(f"base must index one of the {len(features)} feature sets, got {base}")
    full = [frechet_distance_from_features(f, reference).value for f in features]
    return bootstrap_ratios(full, paired_bootstrap_distances(features, reference, rounds, seed), base)
