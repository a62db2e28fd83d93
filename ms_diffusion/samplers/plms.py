"""PLMS: pseudo linear multi-step sampling (Liu et al. 2022), ldm's ``PLMSSampler``.

Equal to diffusers' ``PNDMScheduler(skip_prk_steps=True)``: DDIM (eta = 0) moves driven by an
Adams-Bashforth combination of the last noise predictions; the first step is a pseudo improved
Euler (Heun) step, so S steps cost S + 1 network evaluations.
"""
from __future__ import annotations

import math
import warnings
from typing import List, Optional, Sequence, Tuple

import mindspore as ms
import numpy as np

from ms_diffusion.samplers.base import Denoise, SampleResult
from ms_diffusion.samplers.ddim import ddim_grid, ddim_step
from ms_diffusion.samplers.levels import NoiseLevel, noise_level
from ms_diffusion.samplers.loop import SamplingLoop
from ms_diffusion.schedules import NoiseSchedule

__all__ = ["plms_sample", "plms_combine", "PLMS_MIN_START_ALPHA"]

# Below this sqrt(alpha_cumprod) at the first timestep, x0 = (x - sigma eps') / alpha amplifies the
# error of the combined eps' past what later steps recover from (cosine schedule from t = 999,
# alpha 4.9e-5: FD 27 against 8.1 from ldm's grid at 20 steps).
PLMS_MIN_START_ALPHA = 1e-3

# Adams-Bashforth weights of the current and previous eps, newest first
_AB_WEIGHTS = {1: (1.5, -0.5), 2: (23 / 12, -16 / 12, 5 / 12), 3: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def plms_combine(eps: ms.Tensor, history: List[ms.Tensor]) -> ms.Tensor:
    """Adams-Bashforth eps' from the current eps and the previous ones (``history``, oldest first, 1-3)."""
    weights = _AB_WEIGHTS[len(history)]
    out = weights[0] * eps
    for w, e in zip(weights[1:], reversed(history)):
        out = out + w * e
    return out


def _move(x: ms.Tensor, eps: ms.Tensor, level: NoiseLevel, target: NoiseLevel) -> Tuple[ms.Tensor, ms.Tensor]:
    """DDIM (eta = 0) move of x from ``level`` to ``target`` driven by eps; returns (x_prev, x0)."""
    x0 = (x - level.sigma * eps) * (1.0 / level.alpha)
    return ddim_step(x0, eps, target), x0


def plms_sample(denoise: Denoise, schedule: NoiseSchedule, x: ms.Tensor, rng: np.random.Generator, *,
                steps: Optional[int] = None, timesteps: Optional[Sequence[int]] = None,
                prev_timesteps: Optional[Sequence[int]] = None, spacing: str = "lucidrains", steps_offset: int = 0,
                final_alpha_cumprod: float = 1.0, **loop_options) -> SampleResult:
    """PLMS from x (B, C, H, W) on the same grids as DDIM (``ddim_grid``).

    Step i evaluates eps at (x, t_i), combines it with up to three previous ones (the first step
    averages eps(x, t_0) and eps at the Euler prediction, evaluated at t_1), and moves x to
    ``prev_timesteps[i]`` with eta = 0. ``final_alpha_cumprod`` as in DDIM (ldm and diffusers' PNDM
    use ``schedule.alphas_cumprod[0]``). The eps of a clipping denoiser is already re-derived from
    the clipped x0. Loop options: see ``samplers.loop``.
    """
    ts, prev = ddim_grid(schedule.num_timesteps, steps, spacing, steps_offset, timesteps, prev_timesteps, "plms")
    if schedule.alphas_cumprod[ts[0]] == 0.0:
        raise ValueError(f"plms starts at timestep {ts[0]} where the schedule has zero SNR, so x0 cannot be "
                         f"recovered from eps: use ddim or dpmpp, or start one step earlier (explicit timesteps)")
    start_alpha = math.sqrt(float(schedule.alphas_cumprod[ts[0]]))
    if start_alpha < PLMS_MIN_START_ALPHA:
        warnings.warn(f"plms starts at timestep {ts[0]} where sqrt(alpha_cumprod) = {start_alpha:.1e}: its eps -> x0 "
                      f"step multiplies the model's error by {1 / start_alpha:.0f} and the samples degrade; use "
                      f"spacing='leading' with steps_offset=1 (ldm's grid) or spacing='uniform', or another sampler",
                      stacklevel=2)
    loop = SamplingLoop(denoise, schedule, rng, name="PLMS", num_steps=len(ts), **loop_options)
    loop.start(x, int(ts[0]))
    history: List[ms.Tensor] = []
    for i, (t, tp) in enumerate(loop.steps(zip(ts.tolist(), prev.tolist()))):
        level, target = noise_level(schedule, t), noise_level(schedule, tp, final_alpha_cumprod)
        x = loop.inpaint(x, level)
        eps = loop.predict(x, t)[0]
        if history:
            eps_prime = plms_combine(eps, history)
        elif len(ts) > 1:
            x_euler, _ = _move(x, eps, level, target)
            eps_prime = 0.5 * (eps + loop.predict(x_euler, int(ts[i + 1]))[0])
        else:
            eps_prime = eps
        x, x0 = _move(x, eps_prime, level, target)
        history = (history + [eps])[-3:]
        loop.end_step(i, t, tp, x, x0)
    return loop.result(x)
