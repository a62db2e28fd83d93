"""EDMDiffusion: Karras et al. (2022), "Elucidating the Design Space of Diffusion-Based Generative Models".

    edm = EDMDiffusion(Unet(dim=32, dim_mults=(1, 2, 4), channels=1), image_size=28)
    loss = edm(images)                       # images (B, C, H, W) in [0, 1]
    samples = edm.sample(batch_size=16)      # Heun, 18 steps (35 network evaluations), Karras sigmas

Noisy data x = x0 + sigma eps. The network F is wrapped in the preconditioning of the paper's Table 1:
D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) with

    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2),   c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2),
    c_in = 1 / sqrt(sigma^2 + sigma_data^2),            c_noise = ln(sigma) / 4.

Training draws ln(sigma) ~ N(P_mean, P_std^2) and minimises
lambda(sigma) ||D(x0 + sigma eps; sigma) - x0||^2 with lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2
(the paper sums over pixels; we average, a constant factor).

Sampling walks a table of 1000 Karras-spaced sigmas in [sigma_min, sigma_max]; the sigma-space samplers
(euler, euler_a, heun, dpmpp, dpmpp_sde, unipc) use Karras sigmas by default, so ``heun`` is the
paper's Algorithm 1 (with ``s_churn`` / ``s_tmin`` / ``s_tmax`` / ``s_noise``: Algorithm 2) and
``euler`` diffusers' ``EDMEulerScheduler``. The network's timestep input is c_noise, a float.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple, Union

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from ms_diffusion.diffusion.continuous import ContinuousDiffusion
from ms_diffusion.diffusion.gaussian_terms import elementwise_loss, mean_flat
from ms_diffusion.samplers.levels import NoiseLevel
from ms_diffusion.schedules import ve_sigma_table

__all__ = ["EDMDiffusion", "edm_preconditioning", "edm_loss_weight"]

_KARRAS_SAMPLERS = ("euler", "euler_a", "heun", "dpmpp", "dpmpp_sde", "unipc")


def edm_preconditioning(sigma, sigma_data: float, log=math.log):
    """(c_in, c_noise, c_skip, c_out) at noise level ``sigma`` (float, numpy array or Tensor; ``log`` to match)."""
    total = sigma * sigma + sigma_data * sigma_data
    root = total ** 0.5
    return 1.0 / root, log(sigma) * 0.25, sigma_data * sigma_data / total, sigma * sigma_data / root


def edm_loss_weight(sigma, sigma_data: float):
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (float, array or Tensor)."""
    return (sigma * sigma + sigma_data * sigma_data) / (sigma * sigma_data) ** 2


class EDMDiffusion(ContinuousDiffusion):
    """EDM objective around a denoising network (``models.contract.DenoiserNetwork``, e.g. ``Unet``).

    Images in [0, 1] (``auto_normalize``) or [-1, 1]; shape (B, channels, *image_size). ``times`` of
    ``training_loss`` are the per-sample sigmas (B,) float32.
    """

    default_sampler = "heun"

    def __init__(
        self,
        model: nn.Cell,
        *,
        image_size: Union[int, Sequence[int]],
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        P_mean: float = -1.2,
        P_std: float = 1.2,
        sampling_timesteps: int = 18,
        sampling_table_size: int = 1000,
        auto_normalize: bool = True,
        clip_denoised: bool = False,
        offset_noise_strength: float = 0.0,
        immiscible: bool = False,
        loss_type: str = "l2",
    ):
        if not 0.0 < sigma_min < sigma_max:
            raise ValueError(f"EDM needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        if sigma_data <= 0 or P_std <= 0 or rho <= 0:
            raise ValueError(f"sigma_data, P_std and rho must be positive, got {sigma_data}, {P_std}, {rho}")
        if sampling_table_size < 2:
            raise ValueError(f"sampling_table_size must be >= 2, got {sampling_table_size}")
        karras = {name: {"karras": True} for name in _KARRAS_SAMPLERS}
        super().__init__(model, image_size=image_size,
                         schedule=ve_sigma_table(sigma_min, sigma_max, int(sampling_table_size), rho),
                         sampling_timesteps=sampling_timesteps, auto_normalize=auto_normalize,
                         clip_denoised=clip_denoised, offset_noise_strength=offset_noise_strength,
                         immiscible=immiscible, loss_type=loss_type, sampler_defaults=karras)
        self.sigma_data = float(sigma_data)
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)
        self.P_mean, self.P_std = float(P_mean), float(P_std)

    def noisy(self, x0, noise, times):
        return x0 + times * noise

    def preconditioning(self, times, log):
        c_in, c_noise, c_skip, c_out = edm_preconditioning(times, self.sigma_data, log)
        return c_in, c_noise, c_skip, c_out

    def per_sample_loss(self, x0, noise, x0_hat, out, times):
        weight = edm_loss_weight(times, self.sigma_data).reshape(-1)
        return weight * mean_flat(elementwise_loss(x0_hat, x0, self.loss_type))

    def draw_times(self, rng: np.random.Generator, batch_size: int) -> np.ndarray:
        """sigma = exp(P_mean + P_std n), n ~ N(0, 1): (B,) float32."""
        return np.exp(self.P_mean + self.P_std * rng.standard_normal(batch_size)).astype(np.float32)

    def draw_times_in_graph(self, batch_size: int) -> Tensor:
        return ops.exp(self.P_mean + self.P_std * ops.standard_normal((batch_size,))).astype(ms.float32)

    def native_level(self, level: NoiseLevel) -> Tuple[float, float]:
        """(sigma = sigma_vp / alpha, 1 / alpha): x0 + sigma eps = model-space x / alpha."""
        return level.ve_sigma, 1.0 / level.alpha
