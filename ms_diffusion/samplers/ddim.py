"""DDIM sampling (Song et al. 2021) on any timestep grid, with eta interpolating to DDPM noise."""
from __future__ import annotations

from typing import Optional, Sequence

import mindspore as ms
import numpy as np
from tqdm.auto import tqdm

from ms_diffusion.samplers.base import (Denoise, SampleResult, StepCallback, Trajectory, check_timesteps,
                                        gaussian)
from ms_diffusion.schedules import NoiseSchedule

__all__ = ["ddim_sample", "ddim_coefficients"]


def ddim_coefficients(alpha: float, alpha_prev: float, eta: float):
    """(sqrt(abar_prev), c_eps, sigma) of x_prev = sqrt(abar_prev) x0 + c_eps eps + sigma z."""
    sigma = eta * np.sqrt((1.0 - alpha / alpha_prev) * (1.0 - alpha_prev) / (1.0 - alpha)) if alpha_prev < 1.0 \
        else 0.0
    c_eps = np.sqrt(max(1.0 - alpha_prev - sigma ** 2, 0.0))
    return float(np.sqrt(alpha_prev)), float(c_eps), float(sigma)


def ddim_sample(denoise: Denoise, schedule: NoiseSchedule, x: ms.Tensor, rng: np.random.Generator, *,
                timesteps: Sequence[int], prev_timesteps: Sequence[int], eta: float = 0.0,
                final_alpha_cumprod: float = 1.0, self_condition: bool = False, log_every_t: int = 0,
                callback: Optional[StepCallback] = None, progress: bool = False) -> SampleResult:
    """Run DDIM over ``timesteps`` (descending), jumping from each to ``prev_timesteps[i]``.

    A previous timestep < 0 uses ``final_alpha_cumprod`` (1: lucidrains, returns x0; abar[0]: ldm).
    x: (B, C, H, W) noise at ``timesteps[0]``. eta = 0 is deterministic; eta = 1 is DDPM-like.
    """
    ts = check_timesteps(timesteps, schedule.num_timesteps)
    prev = np.asarray(prev_timesteps, dtype=np.int64)
    if prev.shape != ts.shape:
        raise ValueError(f"prev_timesteps has {prev.shape[0]} entries for {ts.shape[0]} timesteps")
    abar = schedule.alphas_cumprod
    traj = Trajectory(every=log_every_t)
    traj.record(0, len(ts) + 1, int(ts[0]), x, None)
    x0 = None
    for i, (t, tp) in enumerate(tqdm(list(zip(ts, prev)), desc="DDIM", disable=not progress, leave=False)):
        t, tp = int(t), int(tp)
        out = denoise(x, t, x0 if self_condition else None)
        eps, x0 = out[0], out[1]
        alpha_prev = float(abar[tp]) if tp >= 0 else float(final_alpha_cumprod)
        a, c, sigma = ddim_coefficients(float(abar[t]), alpha_prev, eta)
        x = a * x0 + c * eps
        if sigma > 0:
            x = x + sigma * gaussian(rng, x.shape, x.dtype)
        traj.record(i + 1, len(ts) + 1, tp, x, x0)
        if callback is not None:
            callback(i, t, x, x0)
    return SampleResult(x, traj)
