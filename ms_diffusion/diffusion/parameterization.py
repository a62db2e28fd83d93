"""The eps / x0 / v parameterisations of a Gaussian diffusion network (graph-safe functions).

A noisy sample at one level is x = alpha x0 + sigma eps (alpha = sqrt(abar), sigma = sqrt(1 - abar)).
The network predicts one of

* ``pred_noise``: eps (DDPM),
* ``pred_x0``: x0,
* ``pred_v``: v = alpha eps - sigma x0 (Salimans & Ho 2022).

``objective`` is a Python string (a compile-time constant inside jit); alpha and sigma are tensors
or floats broadcastable to x. Other objectives (EDM, flow matching) go in sibling modules.
"""
from __future__ import annotations

from typing import Tuple

from mindspore import Tensor

from ms_diffusion.samplers.thresholding import clip_x0

__all__ = ["OBJECTIVES", "check_objective", "diffuse", "output_to_eps_x0", "training_target", "v_from_eps_x0"]

OBJECTIVES = ("pred_noise", "pred_x0", "pred_v")


def check_objective(objective: str) -> str:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")
    return objective


def diffuse(x0: Tensor, eps: Tensor, alpha, sigma) -> Tensor:
    """The noisy sample x = alpha x0 + sigma eps (same shape as x0)."""
    return alpha * x0 + sigma * eps


def v_from_eps_x0(eps: Tensor, x0: Tensor, alpha, sigma) -> Tensor:
    """v = alpha eps - sigma x0 (same shape as x0)."""
    return alpha * eps - sigma * x0


def training_target(objective: str, x0: Tensor, eps: Tensor, alpha, sigma) -> Tensor:
    """What the network is trained to output for x = alpha x0 + sigma eps; x0, eps (B, C, H, W)."""
    if objective == "pred_noise":
        return eps
    if objective == "pred_x0":
        return x0
    return v_from_eps_x0(eps, x0, alpha, sigma)


def output_to_eps_x0(objective: str, x: Tensor, out: Tensor, alpha, sigma, clip: str = "none",
                     threshold_ratio: float = 0.995, sample_max_value: float = 1.0,
                     rederive_pred_noise: bool = False) -> Tuple[Tensor, Tensor]:
    """(eps, x0), each like x (B, C, H, W), from the network output ``out`` for x = alpha x0 + sigma eps.

    x0 is clipped per ``clip`` (``samplers.thresholding``: "none" / "static" / "dynamic"); eps is then
    re-derived from the clipped x0 (always for pred_x0 / pred_v, as lucidrains; for pred_noise only
    with ``rederive_pred_noise``). The v conversion never divides, so it stays finite at zero SNR
    (alpha = 0) and for clean data (sigma = 0).
    """
    eps = None
    if objective == "pred_noise":
        eps = out
        x0 = (x - sigma * out) / alpha
    elif objective == "pred_x0":
        x0 = out
    else:
        x0 = alpha * x - sigma * out
        eps = alpha * out + sigma * x
    if clip != "none":
        x0 = clip_x0(x0, clip, threshold_ratio, sample_max_value)
        if objective != "pred_noise" or rederive_pred_noise:
            eps = None
    if eps is None:
        eps = (x - alpha * x0) / sigma
    return eps, x0
