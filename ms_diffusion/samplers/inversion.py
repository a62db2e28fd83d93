"""DDIM inversion: run the deterministic DDIM map backwards, image -> noise, for editing.

diffusers' ``DDIMInverseScheduler`` semantics (and null-text inversion's ``next_step``): the DDIM
sampling pairs (t_i -> prev_i) are walked in reverse; the step that lifts x from prev_i to t_i
evaluates the network at (x, t_i) but converts its output at x's own level prev_i (or
``initial_alpha_cumprod`` for the first step), then moves with eta = 0. Sampling the result with
DDIM on the same grid approximately reconstructs the image.
"""
from __future__ import annotations

from typing import Optional, Sequence

import mindspore as ms

from ms_diffusion.samplers.base import Denoise, SampleResult
from ms_diffusion.samplers.ddim import ddim_grid, ddim_step
from ms_diffusion.samplers.levels import noise_level
from ms_diffusion.samplers.loop import SamplingLoop
from ms_diffusion.schedules import NoiseSchedule

__all__ = ["ddim_invert"]


def ddim_invert(denoise: Denoise, schedule: NoiseSchedule, x0: ms.Tensor, *, steps: Optional[int] = None,
                timesteps: Optional[Sequence[int]] = None, prev_timesteps: Optional[Sequence[int]] = None,
                spacing: str = "leading", steps_offset: int = 0, initial_alpha_cumprod: float = 1.0,
                self_condition: bool = False, log_every_t: int = 0, callback=None,
                progress: bool = False) -> SampleResult:
    """Invert clean data x0 (B, C, H, W, model space) to the noise DDIM would map back onto it.

    The grid is DDIM's (``ddim_grid``: ``steps`` on ``spacing``, or explicit descending
    ``timesteps``), walked from its end to its start; the result is at the first (largest)
    timestep, ready as ``x`` / ``x_T`` for ``ddim_sample`` with the same grid and
    ``final_alpha_cumprod = initial_alpha_cumprod``. Step i of the result's trajectory / callback is
    the i-th lift (timesteps ascending). Use a denoiser without clipping: clipping x0 at the
    clean first level would re-derive eps by dividing by sigma = 0.
    """
    ts, prev = ddim_grid(schedule.num_timesteps, steps, spacing, steps_offset, timesteps, prev_timesteps,
                         "ddim inversion")
    ts, prev = ts[::-1], prev[::-1]
    loop = SamplingLoop(denoise, schedule, None, name="DDIM inversion", num_steps=len(ts),
                        self_condition=self_condition, log_every_t=log_every_t, callback=callback, progress=progress)
    x = x0
    loop.start(x, int(prev[0]))
    for i, (t, tp) in enumerate(loop.steps(zip(ts.tolist(), prev.tolist()))):
        here = noise_level(schedule, tp, initial_alpha_cumprod)
        eps, x0_hat = loop.predict(x, t, here)[:2]
        x = ddim_step(x0_hat, eps, noise_level(schedule, t))
        loop.end_step(i, t, t, x, x0_hat)
    return loop.result(x)
