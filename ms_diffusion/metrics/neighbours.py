"""k-nearest-neighbour metrics: precision/recall (Kynkäänniemi et al. 2019) and a memorisation check.

Both work on blocks of the pairwise Euclidean distance matrix, so memory stays bounded
(``block`` rows at a time) whatever the set sizes.

Precision/recall: each real feature vector gets a ball whose radius is the distance to its k-th
nearest other real vector (k = 3 by default, the paper's); the real manifold is the union of the
balls. Precision = the fraction of generated vectors inside some real ball; recall = the fraction
of real vectors inside some generated ball (the same construction, roles swapped). Distances
``<=`` the radius count as inside (torch-fidelity). The paper uses equally many real and
generated vectors; ``precision_recall`` takes what it is given (``evaluate_samples`` draws as
many real vectors as there are samples).

Memorisation: the distance of each generated image to its nearest training image, as the RMS
pixel difference (L2 / sqrt(C·H·W), so 0 is a copy and 1 is black vs white). The threshold is
calibrated on held-out real data: by default the ``quantile`` (1%) of the nearest-training-image
distances of test images, so about 1% of fresh real images fall below it; a model that copies
its training set puts far more of its samples there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ms_diffusion.metrics.frechet import TooFewSamplesError, _as_features

__all__ = ["pairwise_distances", "nearest_distances", "kth_neighbour_radii", "precision_recall", "PrecisionRecall",
           "nearest_training_distances", "nearest_sq_distances", "memorization", "Memorization"]

_BLOCK = 512   # rows per block: a few (block, M) float64 arrays at a time (10,000 real vectors: 41 MB each)


def _sq_norms(x: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", x, x)


def pairwise_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Euclidean distances (N, M) between rows of x (N, D) and y (M, D), computed in float64."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    # (|x|^2 + |y|^2) - 2 x.y as one expression would evaluate it, with two (N, M) arrays instead of four
    d2 = np.add.outer(_sq_norms(x), _sq_norms(y))
    xy = x @ y.T
    xy *= 2.0
    d2 -= xy
    del xy
    np.clip(d2, 0.0, None, out=d2)
    return np.sqrt(d2, out=d2)


def nearest_distances(x: np.ndarray, y: np.ndarray, block: int = _BLOCK) -> np.ndarray:
    """Distance from each row of x (N, D) to its nearest row of y (M, D): (N,) float64."""
    out = np.empty(len(x))
    for s in range(0, len(x), block):
        out[s:s + block] = pairwise_distances(x[s:s + block], y).min(axis=1)
    return out


def kth_neighbour_radii(x: np.ndarray, k: int = 3, block: int = _BLOCK) -> np.ndarray:
    """Distance from each row of x (N, D) to its k-th nearest *other* row: (N,) float64. Needs N > k."""
    if len(x) <= k:
        raise TooFewSamplesError(f"the k-NN radius with k={k} needs more than {k} vectors, got {len(x)}")
    out = np.empty(len(x))
    for s in range(0, len(x), block):
        d = pairwise_distances(x[s:s + block], x)
        out[s:s + block] = np.partition(d, k, axis=1)[:, k]  # index 0 is the point itself (distance 0)
    return out


def _covered_fraction(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, block: int) -> float:
    inside = 0
    for s in range(0, len(points), block):
        d = pairwise_distances(points[s:s + block], centres)
        inside += int(np.count_nonzero((d <= radii[None, :]).any(axis=1)))
    return inside / len(points)


@dataclass(frozen=True)
class PrecisionRecall:
    """Improved precision and recall in [0, 1], the k used, and the set sizes."""

    precision: float
    recall: float
    k: int
    num_real: int
    num_fake: int


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, block: int = _BLOCK) -> PrecisionRecall:
    """Kynkäänniemi et al.'s precision and recall of ``fake`` (N, D) against ``real`` (M, D) features."""
    real, fake = _as_features(real, "real features"), _as_features(fake, "generated features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: {real.shape[1]} vs {fake.shape[1]}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    real_radii = kth_neighbour_radii(real, k, block)
    fake_radii = kth_neighbour_radii(fake, k, block)
    return PrecisionRecall(precision=_covered_fraction(fake, real, real_radii, block),
                           recall=_covered_fraction(real, fake, fake_radii, block),
                           k=int(k), num_real=len(real), num_fake=len(fake))


def _flat_images(images: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(images)
    if x.ndim != 4:
        raise ValueError(f"{what} must be (N, C, H, W) in [0, 1], got shape {x.shape}")
    return x.reshape(len(x), -1).astype(np.float32)


def nearest_training_distances(images: np.ndarray, train_images: np.ndarray, block: int = 1024) -> np.ndarray:
    """RMS pixel distance of each image (N, C, H, W) in [0, 1] to its nearest training image: (N,) float64."""
    x, t = _flat_images(images, "images"), _flat_images(train_images, "training images")
    if x.shape[1] != t.shape[1]:
        raise ValueError(f"images of shape {images.shape[1:]} cannot be compared with training images of shape "
                         f"{train_images.shape[1:]}")
    return np.sqrt(np.clip(nearest_sq_distances(x, t, block), 0.0, None) / x.shape[1])


def nearest_sq_distances(x: np.ndarray, t: np.ndarray, block: int = 1024) -> np.ndarray:
    """Squared Euclidean distance from each row of x (N, D) float32 to its nearest row of t (M, D) float32:
    (N,) float64, not clipped at 0. The minimum over a split of ``t`` is the minimum of the parts' minima,
    so the training set can be streamed (``ms_diffusion.metrics.reference``)."""
    t_sq = _sq_norms(t).astype(np.float64)
    out = np.empty(len(x))
    for s in range(0, len(x), block):
        xb = x[s:s + block]
        # the dot products in float32 (the BLAS-heavy part), the norms and the sum in float64
        d2 = _sq_norms(xb).astype(np.float64)[:, None] + t_sq[None, :] - 2.0 * (xb @ t.T).astype(np.float64)
        out[s:s + block] = d2.min(axis=1)
    return out


@dataclass(frozen=True)
class Memorization:
    """Nearest-training-image distances of the samples, against held-out real images.

    ``fraction_below``: share of samples closer to a training image than ``threshold`` (RMS pixel
    distance); ``reference_fraction``: the same share among held-out real images (≈ the quantile
    when the threshold was calibrated on them). Medians and the 1st percentile describe the
    distributions.
    """

    threshold: float
    fraction_below: float
    reference_fraction: Optional[float]
    median: float
    p01: float
    reference_median: Optional[float]
    num_samples: int
    num_reference: int
    distances: np.ndarray


def memorization(sample_distances: np.ndarray, reference_distances: Optional[np.ndarray] = None, *,
                 threshold: Optional[float] = None, quantile: float = 0.01) -> Memorization:
    """Summarise nearest-training-image distances of samples (N,) against held-out ones (M,).

    ``threshold`` defaults to the ``quantile`` of ``reference_distances`` (one of the two is needed).
    """
    d = np.asarray(sample_distances, np.float64).reshape(-1)
    if len(d) == 0:
        raise TooFewSamplesError("the memorisation check needs at least one sample")
    ref = None if reference_distances is None else np.asarray(reference_distances, np.float64).reshape(-1)
    if threshold is None:
        if ref is None or len(ref) == 0:
            raise ValueError("memorisation: give a threshold or held-out reference distances to calibrate one")
        if not 0.0 < quantile < 1.0:
            raise ValueError(f"quantile must lie in (0, 1), got {quantile}")
        threshold = float(np.quantile(ref, quantile))
    return Memorization(threshold=float(threshold), fraction_below=float(np.mean(d < threshold)),
                        reference_fraction=None if ref is None else float(np.mean(ref < threshold)),
                        median=float(np.median(d)), p01=float(np.quantile(d, 0.01)),
                        reference_median=None if ref is None else float(np.median(ref)),
                        num_samples=len(d), num_reference=0 if ref is None else len(ref), distances=d)
