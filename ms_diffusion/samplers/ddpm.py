"""Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2) through the posterior q(x_{t-1} | x_t, x0)."""
from __future__ import annotations

from typing import Optional, Sequence

import mindspore as ms
import numpy as np
from mindspore import ops
from tqdm.auto import tqdm

from ms_diffusion.samplers.base import (Denoise, SampleResult, StepCallback, Trajectory, check_timesteps,
                                        gaussian)
from ms_diffusion.schedules import NoiseSchedule

__all__ = ["ddpm_sample"]


def ddpm_sample(denoise: Denoise, schedule: NoiseSchedule, x: ms.Tensor, rng: np.random.Generator, *,
                timesteps: Optional[Sequence[int]] = None, self_condition: bool = False,
                log_every_t: int = 0, callback: Optional[StepCallback] = None,
                progress: bool = False) -> SampleResult:
    """Run x_T -> x_0 over ``timesteps`` (default T-1 .. 0, each step t -> t-1).

    x: (B, C, H, W) starting noise at the first timestep. mean = coef1[t] x0 + coef2[t] x_t and
    std = exp(0.5 * log_var_clipped[t]) (or the denoiser's learned log-variance, its optional third
    output); no noise is added at t = 0.
    """
    ts = check_timesteps(range(schedule.num_timesteps - 1, -1, -1) if timesteps is None else timesteps,
                         schedule.num_timesteps)
    traj = Trajectory(every=log_every_t)
    traj.record(0, len(ts) + 1, int(ts[0]) + 1, x, None)
    x0 = None
    for i, t in enumerate(tqdm(ts, desc="DDPM", disable=not progress, leave=False)):
        t = int(t)
        out = denoise(x, t, x0 if self_condition else None)
        x0 = out[1]
        mean = float(schedule.posterior_mean_coef1[t]) * x0 + float(schedule.posterior_mean_coef2[t]) * x
        if t > 0:
            # a learned log-variance (third output) replaces the posterior's
            std = ops.exp(0.5 * out[2]) if len(out) > 2 else float(np.exp(0.5 * schedule.posterior_log_variance_clipped[t]))
            x = mean + std * gaussian(rng, x.shape, x.dtype)
        else:
            x = mean
        traj.record(i + 1, len(ts) + 1, t, x, x0)
        if callback is not None:
            callback(i, t, x, x0)
    return SampleResult(x, traj)
