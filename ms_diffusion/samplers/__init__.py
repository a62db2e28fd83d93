"""Samplers: pure loops over a denoiser ``(x, t, x_self_cond) -> (eps, x0)`` and a NoiseSchedule.

``run_sampler(name, ...)`` is the one entry point the diffusion classes and ``sample.py`` use.
"""
from __future__ import annotations

from typing import Optional, Sequence

import mindspore as ms
import numpy as np

from ms_diffusion.samplers.base import Denoise, SampleResult, Trajectory, gaussian, make_rng
from ms_diffusion.samplers.ddim import ddim_sample
from ms_diffusion.samplers.ddpm import ddpm_sample
from ms_diffusion.schedules import NoiseSchedule, sampling_timesteps

__all__ = ["SAMPLER_NAMES", "run_sampler", "ddpm_sample", "ddim_sample", "SampleResult", "Trajectory",
           "make_rng", "gaussian"]

SAMPLER_NAMES = ("ddpm", "ddim")


def run_sampler(name: str, denoise: Denoise, schedule: NoiseSchedule, x: ms.Tensor, rng: np.random.Generator, *,
                steps: Optional[int] = None, timesteps: Optional[Sequence[int]] = None, eta: float = 0.0,
                spacing: str = "lucidrains", steps_offset: int = 0, final_alpha_cumprod: float = 1.0,
                self_condition: bool = False, log_every_t: int = 0, callback=None,
                progress: bool = False) -> SampleResult:
    """Sample with sampler ``name`` from noise ``x`` (B, C, H, W); returns the result in model space.

    ``steps`` network evaluations on the ``spacing`` grid (see ``schedules.sampling_timesteps``),
    or explicit descending ``timesteps``.
    """
    T = schedule.num_timesteps
    common = dict(self_condition=self_condition, log_every_t=log_every_t, callback=callback, progress=progress)
    if name == "ddpm":
        if timesteps is None and steps not in (None, T):
            raise ValueError(f"ancestral DDPM runs all {T} steps; for {steps} steps use sampler='ddim' "
                             f"(eta=1 gives DDPM-like noise)")
        return ddpm_sample(denoise, schedule, x, rng, timesteps=timesteps, **common)
    if name == "ddim":
        if timesteps is not None:
            ts = np.asarray(timesteps, dtype=np.int64)
            prev = np.append(ts[1:], -1)
        else:
            ts, prev = sampling_timesteps(T, steps or T, spacing, steps_offset)
        return ddim_sample(denoise, schedule, x, rng, timesteps=ts, prev_timesteps=prev, eta=eta,
                           final_alpha_cumprod=final_alpha_cumprod, **common)
    raise ValueError(f"unknown sampler {name!r}; choose one of {SAMPLER_NAMES}")
