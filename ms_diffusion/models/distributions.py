"""The diagonal Gaussian posterior of the KL autoencoder (ldm ``DiagonalGaussianDistribution``).

The math lives in graph-safe functions over the encoder's ``moments`` tensor (B, 2z, h, w) =
cat(mean, logvar) along channels, so compiled loss code can use it; the class is the
convenient (PyNative / host) wrapper that ldm users know. Differences from ldm: ``kl`` / ``nll``
of a deterministic distribution return zeros of shape (B,) rather than a one-element tensor, and
``sample`` takes an optional ``noise`` tensor (drawn with MindSpore's seeded RNG when omitted).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import mindspore as ms
from mindspore import ops

from ms_diffusion.nn.layers import to_float32

__all__ = ["DiagonalGaussianDistribution", "split_moments", "gaussian_sample", "gaussian_kl", "gaussian_nll",
           "LOGVAR_MIN", "LOGVAR_MAX"]

LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0
_LOG_TWO_PI = math.log(2.0 * math.pi)


def split_moments(moments) -> Tuple[ms.Tensor, ms.Tensor]:
    """(B, 2z, ...) -> mean (B, z, ...), log-variance clamped to [-30, 20] (B, z, ...), float32 (a half-precision
    encoder's moments are cast)."""
    mean, logvar = ops.chunk(to_float32(moments), 2, axis=1)
    return mean, ops.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)


def gaussian_sample(mean, logvar, noise=None):
    """mean + exp(logvar / 2) * noise; ``noise`` like ``mean`` (standard normal drawn here if None)."""
    if noise is None:
        noise = ops.standard_normal(mean.shape).astype(mean.dtype)
    return mean + ops.exp(0.5 * logvar) * noise


def _sum_over(x, dims: Sequence[int]):
    return x.sum(axis=tuple(dims))


def gaussian_kl(mean, logvar, other_mean=None, other_logvar=None):
    """KL(N(mean, var) || other) summed over all but the batch axis -> (B,); other defaults to N(0, I)."""
    dims = tuple(range(1, mean.ndim))
    if other_mean is None:
        return 0.5 * _sum_over(mean * mean + ops.exp(logvar) - 1.0 - logvar, dims)
    other_var = ops.exp(other_logvar)
    d = mean - other_mean
    return 0.5 * _sum_over(d * d / other_var + ops.exp(logvar) / other_var - 1.0 - logvar + other_logvar, dims)


def gaussian_nll(sample, mean, logvar, dims: Sequence[int] = (1, 2, 3)):
    """-log N(sample; mean, var) summed over ``dims`` (nats)."""
    d = sample - mean
    return 0.5 * _sum_over(_LOG_TWO_PI + logvar + d * d * ops.exp(-logvar), dims)


class DiagonalGaussianDistribution:
    """N(mean, diag(exp(logvar))) from encoder moments (B, 2z, h, w); log-variance clamped to [-30, 20].

    With ``deterministic=True`` the variance is zero: ``sample`` returns the mean and ``kl`` /
    ``nll`` are zeros of shape (B,).
    """

    def __init__(self, parameters: ms.Tensor, deterministic: bool = False):
        if parameters.ndim < 2 or parameters.shape[1] % 2:
            raise ValueError(f"DiagonalGaussianDistribution needs (batch, 2 * channels, ...) moments, got shape "
                             f"{tuple(parameters.shape)}")
        self.parameters = parameters
        self.deterministic = bool(deterministic)
        self.mean, self.logvar = split_moments(parameters)
        if self.deterministic:
            self.std = ops.zeros_like(self.mean)
            self.var = ops.zeros_like(self.mean)
        else:
            self.std = ops.exp(0.5 * self.logvar)
            self.var = ops.exp(self.logvar)

    def _zeros(self):
        return ops.zeros((self.mean.shape[0],), self.mean.dtype)

    def sample(self, noise: Optional[ms.Tensor] = None) -> ms.Tensor:
        """mean + std * noise, shape of ``mean``."""
        if noise is not None and tuple(noise.shape) != tuple(self.mean.shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)} but the distribution's is {tuple(self.mean.shape)}")
        if self.deterministic:
            return self.mean
        return gaussian_sample(self.mean, self.logvar, noise)

    def mode(self) -> ms.Tensor:
        return self.mean

    def kl(self, other: Optional["DiagonalGaussianDistribution"] = None) -> ms.Tensor:
        """KL(self || other) per sample (B,); ``other`` None means the standard normal."""
        if self.deterministic:
            return self._zeros()
        if other is None:
            return gaussian_kl(self.mean, self.logvar)
        return gaussian_kl(self.mean, self.logvar, other.mean, other.logvar)

    def nll(self, sample: ms.Tensor, dims: Sequence[int] = (1, 2, 3)) -> ms.Tensor:
        """Negative log-likelihood of ``sample`` summed over ``dims``."""
        if self.deterministic:
            return self._zeros()
        return gaussian_nll(sample, self.mean, self.logvar, dims)
