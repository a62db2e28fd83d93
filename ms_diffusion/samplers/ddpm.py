"""Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2) through the posterior q(x_prev | x_t, x0).

On all T steps this is lucidrains' ``p_sample_loop``; on a subset of timesteps it is diffusers'
``DDPMScheduler`` with ``num_inference_steps < T``: each jump t -> prev uses the posterior of the
two-point chain, with beta' = 1 - abar_t / abar_prev.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import mindspore as ms
import numpy as np

from ms_diffusion.samplers.base import (Denoise, SampleResult, check_noise_options, check_steps, check_timesteps,
                                        step_noise)
from ms_diffusion.samplers.loop import SamplingLoop
from ms_diffusion.samplers.levels import noise_level
from ms_diffusion.schedules import NoiseSchedule, sampling_timesteps

__all__ = ["ddpm_sample", "ddpm_posterior", "DDPMStep", "ddpm_timesteps"]


@dataclass(frozen=True)
class DDPMStep:
    """q(x_prev | x_t, x0) = N(coef_x0 x0 + coef_xt x_t, variance) for one jump t -> prev."""

    coef_x0: float
    coef_xt: float
    variance: float
    log_variance: float   # log(max(variance, 1e-20)), as lucidrains / diffusers clamp it
    log_beta: float       # log of the jump's beta' = 1 - abar_t / abar_prev (the "large" variance)


def ddpm_posterior(schedule: NoiseSchedule, t: int, prev: int) -> DDPMStep:
    """Posterior coefficients of the jump t -> prev (prev < 0: to clean data, abar = 1).

    For prev = t - 1 these are the schedule's ``posterior_*`` arrays; ``schedule.v_posterior`` mixes
    the variance with beta' as ldm does.
    """
    abar_t = float(schedule.alphas_cumprod[t])
    abar_p = noise_level(schedule, prev).alpha_cumprod
    beta = 1.0 - abar_t / abar_p
    v = schedule.v_posterior
    variance = (1.0 - v) * (1.0 - abar_p) / (1.0 - abar_t) * beta + v * beta
    return DDPMStep(coef_x0=math.sqrt(abar_p) * beta / (1.0 - abar_t),
                    coef_xt=math.sqrt(1.0 - beta) * (1.0 - abar_p) / (1.0 - abar_t),
                    variance=variance, log_variance=math.log(max(variance, 1e-20)), log_beta=math.log(beta))


def ddpm_timesteps(num_timesteps: int, steps: Optional[int] = None, spacing: str = "leading",
                   steps_offset: int = 0, timesteps: Optional[Sequence[int]] = None) -> np.ndarray:
    """The descending timesteps DDPM visits: all T (default), ``steps`` on a ``spacing`` grid, or explicit."""
    if timesteps is not None:
        return check_timesteps(timesteps, num_timesteps)
    steps = check_steps(steps, num_timesteps, "ddpm")
    if steps == num_timesteps:
        return np.arange(num_timesteps - 1, -1, -1, dtype=np.int64)
    return sampling_timesteps(num_timesteps, steps, spacing, steps_offset)[0]


def _respace_log_variance(log_var: ms.Tensor, schedule: NoiseSchedule, t: int, step: DDPMStep) -> ms.Tensor:
    """Move a learned log-variance from the one-step range at t to the jump's range.

    The denoiser interpolates between log(posterior variance) and log(beta) of the step t -> t-1;
    for a longer jump the same fraction interpolates between the jump's two bounds (diffusers'
    ``learned_range``, improved-DDPM respacing). The map is affine: log_var * k + c.
    """
    lo, hi = float(schedule.posterior_log_variance_clipped[t]), float(np.log(schedule.betas[t]))
    k = (step.log_beta - step.log_variance) / (hi - lo)
    return log_var * k + (step.log_variance - lo * k)


def ddpm_sample(denoise: Denoise, schedule: NoiseSchedule, x: ms.Tensor, rng: np.random.Generator, *,
                steps: Optional[int] = None, timesteps: Optional[Sequence[int]] = None, spacing: str = "leading",
                steps_offset: int = 0, temperature: float = 1.0, noise_dropout: float = 0.0,
                **loop_options) -> SampleResult:
    """Ancestral sampling from x (B, C, H, W) at the first timestep down to x0.

    ``steps`` < T samples on a ``spacing`` grid (see ``schedules.sampling_timesteps``), each step
    jumping to the next grid entry (the last one to clean data). mean = coef_x0 x0 + coef_xt x_t,
    std = exp(0.5 log_var), where log_var is the posterior's or the denoiser's learned one (its
    optional third output); ``temperature`` and ``noise_dropout`` act on the noise as in ldm. No
    noise is added on the last step. Loop options: see ``samplers.loop``.
    """
    check_noise_options(temperature, noise_dropout)
    ts = ddpm_timesteps(schedule.num_timesteps, steps, spacing, steps_offset, timesteps)
    prev = np.append(ts[1:], -1)
    loop = SamplingLoop(denoise, schedule, rng, name="DDPM", num_steps=len(ts), **loop_options)
    loop.start(x, int(ts[0]))
    for i, (t, tp) in enumerate(loop.steps(zip(ts.tolist(), prev.tolist()))):
        x = loop.inpaint(x, noise_level(schedule, t))
        out = loop.predict(x, t)
        x0 = out[1]
        step = ddpm_posterior(schedule, t, tp)
        mean = step.coef_x0 * x0 + step.coef_xt * x
        if tp >= 0:
            if len(out) > 2:
                log_var = out[2] if tp == t - 1 else _respace_log_variance(out[2], schedule, t, step)
                std = ms.ops.exp(0.5 * log_var)
            else:
                std = math.exp(0.5 * step.log_variance)
            x = mean + std * step_noise(rng, x.shape, temperature, noise_dropout, x.dtype)
        else:
            x = mean
        loop.end_step(i, t, tp, x, x0)
    return loop.result(x)
