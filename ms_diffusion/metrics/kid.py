"""Kernel Inception Distance (Bińkowski et al. 2018): unbiased MMD² with a cubic polynomial kernel.

Convention: torch-fidelity's (itself Bińkowski's MMD-GAN code). k(x, y) = (x·y / D + 1)³; the
estimator per subset of m samples from each set is

    MMD² = [sum_{i!=j} k(x_i, x_j) + sum_{i!=j} k(y_i, y_j)] / (m (m - 1)) - 2 sum_{i,j} k(x_i, y_j) / m²

(unbiased: the within-set sums drop the diagonal; the cross term is unbiased as the sets are
independent). ``subsets`` subsets of ``subset_size`` samples are drawn without replacement
from each set (numpy ``RandomState(seed)``, as torch-fidelity), and the mean and standard
deviation over subsets are reported. Unlike torch-fidelity, which refuses a subset larger than
a set, the subset size is capped at the smaller set, as clean-fid does; the size used is returned.
KID can be slightly negative when the distributions are equal.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ms_diffusion.metrics.frechet import TooFewSamplesError, _as_features

__all__ = ["KIDResult", "polynomial_kernel", "mmd2_unbiased", "kernel_inception_distance"]


@dataclass(frozen=True)
class KIDResult:
    """Mean and standard deviation of the unbiased MMD² over ``subsets`` subsets of ``subset_size``."""

    mean: float
    std: float
    subsets: int
    subset_size: int


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: Optional[float] = None,
                      coef0: float = 1.0) -> np.ndarray:
    """(gamma x·yᵀ + coef0)^degree for x (N, D), y (M, D); gamma defaults to 1/D. Returns (N, M)."""
    if gamma is None:
        gamma = 1.0 / x.shape[1]
    return (x @ y.T * gamma + coef0) ** degree


def mmd2_unbiased(k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray) -> float:
    """The unbiased MMD² estimate from (m, m) kernel matrices (see the module docstring)."""
    m = k_xx.shape[0]
    if m < 2 or k_xx.shape != (m, m) or k_xy.shape != (m, m) or k_yy.shape != (m, m):
        raise ValueError(f"kernel matrices must be (m, m) with m >= 2, got {k_xx.shape}, {k_xy.shape}, {k_yy.shape}")
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / (m * m))


def kernel_inception_distance(features1: np.ndarray, features2: np.ndarray, *, subsets: int = 100,
                              subset_size: int = 1000, degree: int = 3, gamma: Optional[float] = None,
                              coef0: float = 1.0, seed: int = 0) -> KIDResult:
    """KID between feature sets (N1, D) and (N2, D) (generated first, real second, as torch-fidelity)."""
    f1, f2 = _as_features(features1, "features1"), _as_features(features2, "features2")
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feature dimensions differ: {f1.shape[1]} vs {f2.shape[1]}")
    m = min(int(subset_size), len(f1), len(f2))
    if m < 2:
        raise TooFewSamplesError(f"KID needs at least 2 samples in each set, got {len(f1)} and {len(f2)}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    rng = np.random.RandomState(seed)
    values = np.empty(int(subsets))
    for i in range(int(subsets)):
        a = f1[rng.choice(len(f1), m, replace=False)]
        b = f2[rng.choice(len(f2), m, replace=False)]
        values[i] = mmd2_unbiased(polynomial_kernel(a, a, degree, gamma, coef0),
                                  polynomial_kernel(a, b, degree, gamma, coef0),
                                  polynomial_kernel(b, b, degree, gamma, coef0))
    return KIDResult(mean=float(values.mean()), std=float(values.std()), subsets=int(subsets), subset_size=m)
