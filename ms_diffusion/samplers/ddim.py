"""DDIM sampling (Song et al. 2021) on any timestep grid, with eta interpolating to DDPM noise.

Covers lucidrains' ``ddim_sample``, ldm's ``DDIMSampler`` (``x_T``, ``mask`` + ``x0`` inpainting,
``temperature``, ``noise_dropout``, ``log_every_t``) and diffusers' ``DDIMScheduler`` (leading /
trailing / linspace spacing, ``steps_offset``, ``set_alpha_to_one`` = ``final_alpha_cumprod``).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import mindspore as ms
import numpy as np

from ms_diffusion.samplers.base import (Denoise, SampleResult, check_noise_options, check_steps, check_timesteps,
                                        step_noise)
from ms_diffusion.samplers.levels import NoiseLevel, noise_level
from ms_diffusion.samplers.loop import SamplingLoop
from ms_diffusion.schedules import NoiseSchedule, sampling_timesteps

__all__ = ["ddim_sample", "ddim_coefficients", "ddim_step", "ddim_grid"]


def ddim_coefficients(alpha: float, alpha_prev: float, eta: float) -> Tuple[float, float, float]:
    """(sqrt(abar_prev), c_eps, sigma) of x_prev = sqrt(abar_prev) x0 + c_eps eps + sigma z.

    ``alpha``, ``alpha_prev``: abar at the current and the target step;
    sigma = eta sqrt((1 - abar_prev) / (1 - abar) (1 - abar / abar_prev)), c_eps = sqrt(1 - abar_prev - sigma^2).
    """
    if alpha_prev < 1.0:
        sigma = eta * math.sqrt((1.0 - alpha / alpha_prev) * (1.0 - alpha_prev) / (1.0 - alpha))
    else:
        sigma = 0.0
    c_eps = math.sqrt(max(1.0 - alpha_prev - sigma ** 2, 0.0))
    return math.sqrt(alpha_prev), c_eps, sigma


def ddim_step(x0: ms.Tensor, eps: ms.Tensor, to: NoiseLevel, c_eps: Optional[float] = None) -> ms.Tensor:
    """The deterministic part of a DDIM move to level ``to``: alpha_to x0 + c_eps eps.

    ``c_eps`` defaults to sigma_to (eta = 0). Used for sampling, PLMS and inversion alike.
    """
    return to.alpha * x0 + (to.sigma if c_eps is None else c_eps) * eps


def ddim_grid(num_timesteps: int, steps: Optional[int] = None, spacing: str = "lucidrains", steps_offset: int = 0,
              timesteps: Optional[Sequence[int]] = None, prev_timesteps: Optional[Sequence[int]] = None,
              sampler: str = "ddim") -> Tuple[np.ndarray, np.ndarray]:
    """(timesteps, prev_timesteps) of a DDIM-style sampler (see ``schedules.sampling_timesteps``).

    Explicit ``timesteps`` jump to the next entry (the last to -1) unless ``prev_timesteps`` is given.
    """
    if timesteps is None:
        if prev_timesteps is not None:
            raise ValueError(f"{sampler}: prev_timesteps needs explicit timesteps")
        return sampling_timesteps(num_timesteps, check_steps(steps, num_timesteps, sampler), spacing, steps_offset)
    ts = check_timesteps(timesteps, num_timesteps)
    if prev_timesteps is None:
        return ts, np.append(ts[1:], -1)
    prev = np.asarray(prev_timesteps, dtype=np.int64)
    if prev.shape != ts.shape:
        raise ValueError(f"{sampler}: prev_timesteps has {prev.shape[0]} entries for {ts.shape[0]} timesteps")
    if np.any(prev >= ts):
        raise ValueError(f"{sampler}: every prev_timestep must be below its timestep")
    return ts, np.where(prev < 0, -1, prev)


def ddim_sample(denoise: Denoise, schedule: NoiseSchedule, x: ms.Tensor, rng: np.random.Generator, *,
                steps: Optional[int] = None, timesteps: Optional[Sequence[int]] = None,
                prev_timesteps: Optional[Sequence[int]] = None, spacing: str = "lucidrains", steps_offset: int = 0,
                eta: float = 0.0, final_alpha_cumprod: float = 1.0, temperature: float = 1.0,
                noise_dropout: float = 0.0, **loop_options) -> SampleResult:
    """Run DDIM from x (B, C, H, W), the noise at the first timestep (ldm's ``x_T``).

    ``steps`` on a ``spacing`` grid, or explicit descending ``timesteps`` (each jumping to
    ``prev_timesteps[i]``, default the next entry). A previous timestep < 0 uses
    ``final_alpha_cumprod`` (1: lucidrains / diffusers ``set_alpha_to_one``, returns x0;
    ``schedule.alphas_cumprod[0]``: ldm). eta = 0 is deterministic, eta = 1 DDPM-like; the noise
    takes ldm's ``temperature`` and ``noise_dropout``. Loop options: see ``samplers.loop``.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    check_noise_options(temperature, noise_dropout)
    ts, prev = ddim_grid(schedule.num_timesteps, steps, spacing, steps_offset, timesteps, prev_timesteps)
    loop = SamplingLoop(denoise, schedule, rng, name="DDIM", num_steps=len(ts), **loop_options)
    loop.start(x, int(ts[0]))
    for i, (t, tp) in enumerate(loop.steps(zip(ts.tolist(), prev.tolist()))):
        level, target = noise_level(schedule, t), noise_level(schedule, tp, final_alpha_cumprod)
        x = loop.inpaint(x, level)
        out = loop.predict(x, t)
        eps, x0 = out[0], out[1]
        _, c_eps, sigma = ddim_coefficients(level.alpha_cumprod, target.alpha_cumprod, eta)
        x = ddim_step(x0, eps, target, c_eps)
        if sigma > 0:
            x = x + sigma * step_noise(rng, x.shape, temperature, noise_dropout, x.dtype)
        loop.end_step(i, t, tp, x, x0)
    return loop.result(x)
