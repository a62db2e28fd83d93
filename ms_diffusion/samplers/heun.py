"""Heun's second-order method (Karras et al. 2022, Algorithm 1; Algorithm 2 with churn) on any VP schedule.

Works in k-diffusion's scaling x = x0 + sigma * eps = x_t / sqrt(abar) on ``euler.sigma_grid`` (see
``samplers.euler`` for the scaling and the differences from diffusers). Matches diffusers'
``HeunDiscreteScheduler`` step by step: every step is an Euler step followed by a correction that
averages the derivatives at both ends (2 network evaluations), except the last step to clean data,
which is plain Euler -- 2 S - 1 evaluations for S steps.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import mindspore as ms
import numpy as np

from ms_diffusion.samplers.base import Denoise, SampleResult
from ms_diffusion.samplers.euler import Churn, _derivative, integrate, sigma_grid
from ms_diffusion.samplers.loop import SamplingLoop
from ms_diffusion.schedules import NoiseSchedule

__all__ = ["heun_sample"]


def heun_sample(denoise: Denoise, schedule: NoiseSchedule, x: ms.Tensor, rng: np.random.Generator, *,
                steps: Optional[int] = None, timesteps: Optional[Sequence[int]] = None, spacing: str = "linspace",
                steps_offset: int = 0, karras: bool = False, s_churn: float = 0.0, s_tmin: float = 0.0,
                s_tmax: float = math.inf, s_noise: float = 1.0, **loop_options) -> SampleResult:
    """Heun from noise x (B, C, H, W) (model space ~N(0, 1)) in ``steps`` steps, 2 * steps - 1 evaluations.

    Grid options as ``euler_sample``; ``s_churn`` / ``s_tmin`` / ``s_tmax`` / ``s_noise``: EDM's stochastic
    sampler (Algorithm 2, ``euler.Churn``; noise from ``rng``). Returns model-space samples; the
    callback and trajectory see each completed step (not the intermediate Euler predictions) in model
    space, with the x0 of the step's last evaluation. Without churn deterministic (``rng`` only used for
    inpainting). Loop options: see ``samplers.loop``.
    """
    churn = Churn(s_churn, s_tmin, s_tmax, s_noise).check("heun")
    ts, levels = sigma_grid(schedule, steps, spacing, steps_offset, karras, timesteps, name="heun")
    loop = SamplingLoop(denoise, schedule, rng, name="Heun", num_steps=len(ts), **loop_options)

    def step(i, x, d, x0, level):
        dt = levels[i + 1].ve_sigma - level.ve_sigma
        if i == len(ts) - 1:    # to sigma = 0: Euler
            return x + d * dt, x0
        d2, x0 = _derivative(loop, x + d * dt, int(ts[i + 1]), levels[i + 1])
        return x + (d + d2) * (0.5 * dt), x0

    return integrate(loop, x, ts, levels, step, churn)
