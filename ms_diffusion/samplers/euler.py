"""Euler and Euler ancestral (Karras et al. 2022 / k-diffusion) on a discrete-time VP diffusion.

The samplers integrate in k-diffusion's variance-exploding scaling x = x0 + sigma * eps with
sigma = sqrt((1 - abar) / abar), i.e. x = x_t / sqrt(abar) for our x_t = sqrt(abar) x0 + sqrt(1 - abar) eps;
the network still sees x_t (model space), as diffusers' ``scale_model_input`` does. The denoiser's x0
(any prediction type, clipped there if asked) gives the ODE derivative d = (x - x0) / sigma.

Matches diffusers' ``EulerDiscreteScheduler`` (``interpolation_type="linear"``, ``final_sigmas_type="zero"``,
no ``s_churn``) and ``EulerAncestralDiscreteScheduler`` step by step; the grid is ``sigma_grid``.
Differences, by design: (1) our denoisers take integer timesteps, so where diffusers' grid is
fractional (``linspace`` spacing, Karras sigmas) the network sees the rounded timestep while the
conversion to (eps, x0) uses the exact sigma; (2) the starting noise x (model space, ~N(0, 1)) is
scaled to x / sqrt(abar) = x * sqrt(1 + sigma_max^2), where diffusers' ``init_noise_sigma`` is
sigma_max for ``linspace`` / ``trailing`` spacing.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import mindspore as ms
import numpy as np

from ms_diffusion.samplers.base import Denoise, SampleResult, check_steps, check_timesteps, gaussian
from ms_diffusion.samplers.levels import CLEAN, NoiseLevel, sigma_to_timestep
from ms_diffusion.samplers.loop import SamplingLoop
from ms_diffusion.schedules import NoiseSchedule, sampling_timesteps

__all__ = ["sigma_grid", "euler_sample", "euler_ancestral_sample"]


def sigma_grid(schedule: NoiseSchedule, steps: Optional[int] = None, spacing: str = "linspace",
               steps_offset: int = 0, karras: bool = False, timesteps: Optional[Sequence[int]] = None,
               rho: float = 7.0, name: str = "euler") -> Tuple[np.ndarray, List[NoiseLevel]]:
    """(timesteps (S,) int64, levels (S + 1)) of the k-diffusion samplers, the last level clean data.

    Grid as diffusers' Euler / Heun schedulers: ``linspace`` is ``linspace(0, T - 1, S)`` reversed
    (fractional; ``steps_offset`` ignored, as diffusers does), every other spacing the integer grid of
    ``schedules.sampling_timesteps``; sigmas are the schedule's variance-exploding sigmas interpolated
    linearly in t. ``karras`` replaces them by Karras sigmas (``rho``) between the grid's smallest and
    largest sigma, at the fractional timesteps ``levels.sigma_to_timestep`` gives. The network
    timesteps are the grid's rounded to integers.
    """
    T = schedule.num_timesteps
    abar = schedule.alphas_cumprod
    with np.errstate(divide="ignore"):
        ve = np.sqrt((1.0 - abar) / abar)
    if timesteps is not None:
        if karras:
            raise ValueError(f"{name}: karras=True chooses its own timesteps; do not pass timesteps as well")
        ts = check_timesteps(timesteps, T).astype(np.float64)
    else:
        steps = check_steps(steps, T, name)
        if spacing == "linspace":
            ts = np.linspace(0, T - 1, steps, dtype=np.float64)[::-1].copy()
        else:
            ts = sampling_timesteps(T, steps, spacing, steps_offset)[0].astype(np.float64)
    sigmas = np.interp(ts, np.arange(T), ve)
    if not np.all(np.isfinite(sigmas)):
        raise ValueError(f"{name} needs a finite sigma at every timestep it visits; the schedule has zero terminal "
                         f"SNR (sigma = inf at t = {T - 1}): use spacing='leading' or another sampler")
    if karras:
        lo, hi = float(sigmas.min()) ** (1.0 / rho), float(sigmas.max()) ** (1.0 / rho)
        sigmas = (hi + np.linspace(0.0, 1.0, len(ts)) * (lo - hi)) ** rho
        ts = np.array([sigma_to_timestep(schedule, s) for s in sigmas])
    net_ts = np.clip(np.rint(ts), 0, T - 1).astype(np.int64)
    return net_ts, [NoiseLevel.from_ve_sigma(s) for s in sigmas] + [CLEAN]


def _start(loop: SamplingLoop, x: ms.Tensor, ts: np.ndarray, level: NoiseLevel) -> ms.Tensor:
    """Record the model-space start x (B, C, H, W) and return it in VE scaling, x / alpha."""
    loop.start(x, int(ts[0]))
    return x * (1.0 / level.alpha)


def _derivative(loop: SamplingLoop, x: ms.Tensor, t: int, level: NoiseLevel) -> Tuple[ms.Tensor, ms.Tensor]:
    """(d = (x - x0) / sigma, x0) at VE-scaled x and ``level``: the network sees alpha * x at timestep t."""
    x0 = loop.predict(x * level.alpha, t, level)[1]
    return (x - x0) * (1.0 / level.ve_sigma), x0


def _inpaint(loop: SamplingLoop, x: ms.Tensor, level: NoiseLevel) -> ms.Tensor:
    if loop.mask is None:
        return x
    return loop.inpaint(x * level.alpha, level) * (1.0 / level.alpha)


def integrate(loop: SamplingLoop, x: ms.Tensor, ts: np.ndarray, levels: Sequence[NoiseLevel],
              step: Callable[[int, ms.Tensor, ms.Tensor, ms.Tensor], Tuple[ms.Tensor, ms.Tensor]]) -> SampleResult:
    """The loop every sigma-space sampler shares: scale the noise x to levels[0], then per step i inpaint, take
    the derivative d and x0 at levels[i], ``step(i, x, d, x0) -> (x at levels[i + 1], x0)``, report the step."""
    n = len(ts)
    x = _start(loop, x, ts, levels[0])
    for i, t in enumerate(loop.steps(ts.tolist())):
        x = _inpaint(loop, x, levels[i])
        d, x0 = _derivative(loop, x, t, levels[i])
        x, x0 = step(i, x, d, x0)
        loop.end_step(i, t, -1 if i == n - 1 else int(ts[i + 1]), x * levels[i + 1].alpha, x0)
    return loop.result(x)


def euler_sample(denoise: Denoise, schedule: NoiseSchedule, x: ms.Tensor, rng: np.random.Generator, *,
                 steps: Optional[int] = None, timesteps: Optional[Sequence[int]] = None, spacing: str = "linspace",
                 steps_offset: int = 0, karras: bool = False, **loop_options) -> SampleResult:
    """Euler's method on the probability-flow ODE from noise x (B, C, H, W), model space ~N(0, 1).

    ``steps`` network evaluations on ``sigma_grid`` (``spacing`` / ``steps_offset`` / ``karras`` /
    ``timesteps``); the last step lands on clean data. Returns model-space samples (data range,
    [-1, 1] for images); trajectory and callback see model space (x_t = alpha * x) too.
    Deterministic: ``rng`` is only used for inpainting. Not implemented: diffusers' ``s_churn`` /
    ``s_tmin`` / ``s_tmax`` / ``s_noise``. Loop options: see ``samplers.loop``.
    """
    ts, levels = sigma_grid(schedule, steps, spacing, steps_offset, karras, timesteps, name="euler")
    loop = SamplingLoop(denoise, schedule, rng, name="Euler", num_steps=len(ts), **loop_options)

    def step(i, x, d, x0):
        return x + d * (levels[i + 1].ve_sigma - levels[i].ve_sigma), x0

    return integrate(loop, x, ts, levels, step)


def euler_ancestral_sample(denoise: Denoise, schedule: NoiseSchedule, x: ms.Tensor, rng: np.random.Generator, *,
                           steps: Optional[int] = None, timesteps: Optional[Sequence[int]] = None,
                           spacing: str = "linspace", steps_offset: int = 0, karras: bool = False,
                           **loop_options) -> SampleResult:
    """Euler ancestral from noise x (B, C, H, W) (model space ~N(0, 1)) on ``sigma_grid``, ``steps`` evaluations.

    Each step goes down to sigma_down by Euler, then adds fresh noise from ``rng`` (one float32
    standard normal draw of x's shape per step except the last) times sigma_up, with
    sigma_up^2 = s'^2 (s^2 - s'^2) / s^2 and sigma_down^2 = s'^2 - sigma_up^2 (eta = 1).
    Returns model-space samples; loop options: see ``samplers.loop``.
    """
    ts, levels = sigma_grid(schedule, steps, spacing, steps_offset, karras, timesteps, name="euler_a")
    loop = SamplingLoop(denoise, schedule, rng, name="Euler ancestral", num_steps=len(ts), **loop_options)

    def step(i, x, d, x0):
        s, s_next = levels[i].ve_sigma, levels[i + 1].ve_sigma
        s_up = math.sqrt(max(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2, 0.0))
        s_down = math.sqrt(max(s_next ** 2 - s_up ** 2, 0.0))
        x = x + d * (s_down - s)
        if s_up > 0.0:
            x = x + gaussian(rng, x.shape, x.dtype) * s_up
        return x, x0

    return integrate(loop, x, ts, levels, step)
