"""Loss terms of Gaussian diffusion (graph-safe): per-element losses, normal KL, discretized likelihood.

Shapes: images (B, C, H, W); per-sample reductions return (B,). Log-variances are natural logs;
``vb_bits`` returns bits per dimension (improved DDPM, Nichol & Dhariwal 2021).
"""
from __future__ import annotations

import math

from mindspore import Tensor, ops

__all__ = ["LOSS_TYPES", "check_loss_type", "mean_flat", "elementwise_loss", "normal_kl",
           "discretized_gaussian_log_likelihood", "vb_bits"]

LOSS_TYPES = ("l2", "l1", "huber")
_LN2 = math.log(2.0)


def check_loss_type(loss_type: str) -> str:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")
    return loss_type


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every axis but the first: (B, ...) -> (B,)."""
    return x.mean(axis=tuple(range(1, x.ndim)))


def elementwise_loss(pred: Tensor, target: Tensor, loss_type: str = "l2") -> Tensor:
    """Per-element l2 (squared error), l1, or huber (smooth L1 with beta 1, the MindSpore tutorial's loss)."""
    d = pred - target
    if loss_type == "l2":
        return d * d
    if loss_type == "l1":
        return ops.abs(d)
    ad = ops.abs(d)
    return ops.where(ad < 1.0, 0.5 * d * d, ad - 0.5)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + ops.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * ops.exp(-logvar2))


def _approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + ops.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales, thres: float = 0.999):
    """log p(x) of 8-bit data x in [-1, 1] under N(means, exp(log_scales)^2), bins of width 2/255."""
    centered = x - means
    inv_std = ops.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = ops.log(ops.clamp(cdf_plus, min=1e-15))
    log_one_minus_cdf_min = ops.log(ops.clamp(1.0 - cdf_min, min=1e-15))
    log_delta = ops.log(ops.clamp(cdf_plus - cdf_min, min=1e-15))
    return ops.where(x < -thres, log_cdf_plus, ops.where(x > thres, log_one_minus_cdf_min, log_delta))


def vb_bits(x_start, t, true_mean, true_log_var, model_mean, model_log_var) -> Tensor:
    """One term of the variational bound per sample (B,), bits/dim: the decoder NLL at t = 0, else the KL.

    ``true_*``: q(x_{t-1} | x_t, x0); ``model_*``: p(x_{t-1} | x_t); x_start (B, C, H, W) in [-1, 1].
    """
    kl = mean_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / _LN2
    nll = -mean_flat(discretized_gaussian_log_likelihood(x_start, model_mean, 0.5 * model_log_var)) / _LN2
    return ops.where(t == 0, nll, kl)
