"""Euler and Euler ancestral (Karras et al. 2022 / k-diffusion) on any VP schedule (a discrete-time diffusion's,
or the level table of an EDM / flow-matching model).

The samplers integrate in k-diffusion's variance-exploding scaling x = x0 + sigma * eps with
sigma = sqrt((1 - abar) / abar), i.e. x = x_t / sqrt(abar) for our x_t = sqrt(abar) x0 + sqrt(1 - abar) eps;
the network still sees x_t (model space), as diffusers' ``scale_model_input`` does. The denoiser's x0
(any prediction type, clipped there if asked) gives the ODE derivative d = (x - x0) / sigma.

Matches diffusers' ``EulerDiscreteScheduler`` (``interpolation_type="linear"``, ``final_sigmas_type="zero"``,
no ``s_churn``) and ``EulerAncestralDiscreteScheduler`` step by step; the grid is ``sigma_grid``. With churn we
follow EDM's Algorithm 2 (``Churn``). Differences, by design: (1) a discrete diffusion's denoiser takes integer
timesteps, so where diffusers' grid is fractional (``linspace`` spacing, Karras sigmas) the network sees the
rounded timestep while the conversion to (eps, x0) uses the exact sigma; (2) the starting noise x (model space,
~N(0, 1)) is scaled to x / sqrt(abar) = x * sqrt(1 + sigma_max^2), where diffusers' ``init_noise_sigma`` is
sigma_max for ``linspace`` / ``trailing`` spacing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import mindspore as ms
import numpy as np

from ms_diffusion.samplers.base import Denoise, SampleResult, check_steps, check_timesteps, gaussian
from ms_diffusion.samplers.levels import CLEAN, NoiseLevel, sigma_to_timestep
from ms_diffusion.samplers.loop import SamplingLoop
from ms_diffusion.schedules import NoiseSchedule, karras_sigma_ramp, sampling_timesteps

__all__ = ["sigma_grid", "Churn", "integrate", "euler_sample", "euler_ancestral_sample"]


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
        sigmas = karras_sigma_ramp(float(sigmas.min()), float(sigmas.max()), len(ts), rho)
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


@dataclass(frozen=True)
class Churn:
    """EDM's stochastic churn (Karras et al. 2022, Algorithm 2): before the step at sigma in [s_tmin, s_tmax],
    raise the noise to sigma_hat = sigma (1 + gamma), gamma = min(s_churn / S, sqrt(2) - 1) for S steps, by
    adding fresh noise of std s_noise sqrt(sigma_hat^2 - sigma^2); the step then starts from sigma_hat, where
    the network is evaluated (diffusers' Euler schedulers reuse the output computed at sigma instead)."""

    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0

    def check(self, name: str) -> Optional["Churn"]:
        """None when churn is off; ValueError naming a bad option."""
        if not (self.s_churn >= 0.0 and self.s_noise >= 0.0 and 0.0 <= self.s_tmin <= self.s_tmax):
            raise ValueError(f"{name}: churn needs s_churn >= 0, s_noise >= 0 and 0 <= s_tmin <= s_tmax, got "
                             f"{self.s_churn}, {self.s_noise}, {self.s_tmin}, {self.s_tmax}")
        return self if self.s_churn > 0.0 else None

    def apply(self, loop: SamplingLoop, x: ms.Tensor, t: int, level: NoiseLevel, num_steps: int
              ) -> Tuple[ms.Tensor, int, NoiseLevel]:
        """(x, network timestep, level) after churn at VE-scaled x, timestep t and ``level``."""
        sigma = level.ve_sigma
        gamma = min(self.s_churn / num_steps, math.sqrt(2.0) - 1.0) if self.s_tmin <= sigma <= self.s_tmax else 0.0
        if gamma <= 0.0:
            return x, t, level
        sigma_hat = sigma * (1.0 + gamma)
        x = x + gaussian(loop.rng, x.shape, x.dtype) * (self.s_noise * math.sqrt(sigma_hat ** 2 - sigma ** 2))
        t_hat = int(np.clip(round(sigma_to_timestep(loop.schedule, sigma_hat)), 0, loop.schedule.num_timesteps - 1))
        return x, t_hat, NoiseLevel.from_ve_sigma(sigma_hat)


def integrate(loop: SamplingLoop, x: ms.Tensor, ts: np.ndarray, levels: Sequence[NoiseLevel],
              step: Callable[[int, ms.Tensor, ms.Tensor, ms.Tensor, NoiseLevel], Tuple[ms.Tensor, ms.Tensor]],
              churn: Optional[Churn] = None) -> SampleResult:
    """The loop every sigma-space sampler shares: scale the noise x to levels[0], then per step i inpaint, apply
    ``churn`` (if any), take the derivative d and x0 at the step's level, ``step(i, x, d, x0, level) -> (x at
    levels[i + 1], x0)``, report the step."""
    n = len(ts)
    x = _start(loop, x, ts, levels[0])
    for i, t in enumerate(loop.steps(ts.tolist())):
        x = _inpaint(loop, x, levels[i])
        level = levels[i]
        if churn is not None:
            x, t, level = churn.apply(loop, x, t, level, n)
        d, x0 = _derivative(loop, x, t, level)
        x, x0 = step(i, x, d, x0, level)
        loop.end_step(i, t, -1 if i == n - 1 else int(ts[i + 1]), x * levels[i + 1].alpha, x0)
    return loop.result(x)


def euler_sample(denoise: Denoise, schedule: NoiseSchedule, x: ms.Tensor, rng: np.random.Generator, *,
                 steps: Optional[int] = None, timesteps: Optional[Sequence[int]] = None, spacing: str = "linspace",
                 steps_offset: int = 0, karras: bool = False, s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = math.inf, s_noise: float = 1.0, **loop_options) -> SampleResult:
    """Euler's method on the probability-flow ODE from noise x (B, C, H, W), model space ~N(0, 1).

    ``steps`` network evaluations on ``sigma_grid`` (``spacing`` / ``steps_offset`` / ``karras`` /
    ``timesteps``); the last step lands on clean data. Returns model-space samples (data range,
    [-1, 1] for images); trajectory and callback see model space (x_t = alpha * x) too.
    ``s_churn`` > 0 adds EDM's churn (``Churn``; noise from ``rng``); otherwise deterministic (``rng``
    only used for inpainting). Loop options: see ``samplers.loop``.
    """
    churn = Churn(s_churn, s_tmin, s_tmax, s_noise).check("euler")
    ts, levels = sigma_grid(schedule, steps, spacing, steps_offset, karras, timesteps, name="euler")
    loop = SamplingLoop(denoise, schedule, rng, name="Euler", num_steps=len(ts), **loop_options)

    def step(i, x, d, x0, level):
        return x + d * (levels[i + 1].ve_sigma - level.ve_sigma), x0

    return integrate(loop, x, ts, levels, step, churn)


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

    def step(i, x, d, x0, level):
        s, s_next = level.ve_sigma, levels[i + 1].ve_sigma
        s_up = math.sqrt(max(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2, 0.0))
        s_down = math.sqrt(max(s_next ** 2 - s_up ** 2, 0.0))
        x = x + d * (s_down - s)
        if s_up > 0.0:
            x = x + gaussian(rng, x.shape, x.dtype) * s_up
        return x, x0

    return integrate(loop, x, ts, levels, step)
