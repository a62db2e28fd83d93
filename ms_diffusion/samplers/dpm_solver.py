"""DPM-Solver++ multistep (Lu et al. 2022), data-prediction form, orders 1-3, and its SDE variant.

Matches diffusers' ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_type="midpoint",
final_sigmas_type="zero")``: the solver integrates in lambda = log(alpha / sigma) using the
denoiser's x0 predictions (clipped or dynamically thresholded there), reuses the previous one or
two of them for orders 2 and 3, and always ends with a first-order step to clean data.

``algorithm="sde-dpmsolver++"`` (sampler ``dpmpp_sde``, orders 1-2) is diffusers' SDE variant
(``algorithm_type="sde-dpmsolver++"``, ``solver_type="midpoint"``, k-diffusion's DPM++ 2M SDE with
eta = 1): each step also injects fresh noise from the sampler's rng, one float32 standard normal draw
of x's shape per step but the last (which lands on clean data, where the noise coefficient is 0).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import mindspore as ms
import numpy as np

from ms_diffusion.samplers.base import Denoise, SampleResult, check_steps, check_timesteps, gaussian
from ms_diffusion.samplers.levels import CLEAN, NoiseLevel, karras_grid, noise_levels
from ms_diffusion.samplers.loop import SamplingLoop
from ms_diffusion.schedules import NoiseSchedule, sampling_timesteps

__all__ = ["dpmpp_sample", "dpmpp_sde_sample", "dpmpp_grid", "dpmpp_update", "dpmpp_sde_update", "DPMPP_ORDERS",
           "DPMPP_SDE_ORDERS", "DPMPP_ALGORITHMS"]

DPMPP_ORDERS = (1, 2, 3)
DPMPP_SDE_ORDERS = (1, 2)
DPMPP_ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++")


def dpmpp_grid(schedule: NoiseSchedule, steps: Optional[int] = None, spacing: str = "linspace",
               steps_offset: int = 0, karras: bool = False, timesteps: Optional[Sequence[int]] = None
               ) -> Tuple[np.ndarray, List[NoiseLevel]]:
    """(timesteps (S,), levels (S + 1)) of DPM-Solver++: the network's timesteps and the noise levels
    the solver steps through, the last being clean data.

    ``linspace`` and ``leading`` follow diffusers' DPM-Solver grids, which differ from its DDIM
    ones: S + 1 points with the final 0 dropped, e.g. T = 1000, S = 10 linspace gives 999, 899, ...,
    100 (then clean) where DDIM's ends at 0. Other spacings use ``schedules.sampling_timesteps``.
    ``karras`` replaces the levels by Karras sigmas and the timesteps by their rounded positions.
    """
    T = schedule.num_timesteps
    if timesteps is not None:
        if karras:
            raise ValueError("dpmpp: karras=True chooses its own timesteps; do not pass timesteps as well")
        ts = check_timesteps(timesteps, T)
        return ts, noise_levels(schedule, ts) + [CLEAN]
    steps = check_steps(steps, T, "dpmpp")
    if karras:
        ts, levels = karras_grid(schedule, steps)
        return ts, levels + [CLEAN]
    if spacing in ("linspace", "leading"):
        if steps + 1 > T:
            raise ValueError(f"dpmpp with {spacing!r} spacing places steps + 1 points on the {T} training "
                             f"timesteps: use at most {T - 1} steps, or spacing='trailing'")
        ts = sampling_timesteps(T, steps + 1, spacing, steps_offset)[0][:-1]
    else:
        ts = sampling_timesteps(T, steps, spacing, steps_offset)[0]
    return ts, noise_levels(schedule, ts) + [CLEAN]


def dpmpp_update(x: ms.Tensor, x0s: Sequence[ms.Tensor], levels: Sequence[NoiseLevel]) -> ms.Tensor:
    """One multistep DPM-Solver++ step of order k = len(x0s) (1-3) from ``levels[-2]`` to ``levels[-1]``.

    x: (B, C, H, W) at levels[-2]; x0s: the data predictions at levels[-k-1:-1], oldest first.
    """
    k = len(x0s)
    if len(levels) != k + 1:
        raise ValueError(f"dpmpp_update of order {k} needs {k + 1} levels, got {len(levels)}")
    s0, t = levels[-2], levels[-1]
    # exp(-h) = (sigma_t / alpha_t) / (sigma_s / alpha_s): finite (0) when the target is clean
    em = t.ve_sigma / s0.ve_sigma if s0.ve_sigma != math.inf else 0.0
    phi1 = -math.expm1(-(t.log_snr - s0.log_snr)) if k > 1 else 1.0 - em    # 1 - exp(-h)
    m0 = x0s[-1]
    out = (t.sigma / s0.sigma) * x + (t.alpha * phi1) * m0
    if k == 1:
        return out
    h = t.log_snr - s0.log_snr
    h0 = s0.log_snr - levels[-3].log_snr
    r0 = h0 / h
    m1 = x0s[-2]
    if k == 2:
        return out + (0.5 * t.alpha * phi1 / r0) * (m0 - m1)
    h1 = levels[-3].log_snr - levels[-4].log_snr
    r1 = h1 / h
    m2 = x0s[-3]
    d1_0 = (1.0 / r0) * (m0 - m1)
    d1_1 = (1.0 / r1) * (m1 - m2)
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
    return (out + (t.alpha * (1.0 - phi1 / h)) * d1
            - (t.alpha * ((h - phi1) / h ** 2 - 0.5)) * d2)


def dpmpp_sde_update(x: ms.Tensor, x0s: Sequence[ms.Tensor], levels: Sequence[NoiseLevel],
                     noise: Optional[ms.Tensor]) -> ms.Tensor:
    """One multistep SDE-DPM-Solver++ step (midpoint) of order k = len(x0s) (1-2) from ``levels[-2]`` to
    ``levels[-1]``, with h = lambda_t - lambda_s:

    x_t = (sigma_t / sigma_s) e^-h x + alpha_t (1 - e^-2h) (m0 + (m0 - m1) / (2 r0)) + sigma_t sqrt(1 - e^-2h) z.

    x, noise z: (B, C, H, W); x0s: the data predictions at levels[-k-1:-1], oldest first. ``noise`` may
    be None only when the target level is clean (its coefficient is then 0).
    """
    k = len(x0s)
    if k not in DPMPP_SDE_ORDERS or len(levels) != k + 1:
        raise ValueError(f"dpmpp_sde_update of order {k} (1-2) needs {k + 1} levels, got {len(levels)}")
    s0, t = levels[-2], levels[-1]
    h = t.log_snr - s0.log_snr                 # +inf towards clean data or from zero SNR
    em = math.exp(-h)                          # e^-h
    phi2 = -math.expm1(-2.0 * h)               # 1 - e^-2h
    m0 = x0s[-1]
    out = ((t.sigma / s0.sigma) * em) * x + (t.alpha * phi2) * m0
    if k == 2:
        r0 = (s0.log_snr - levels[-3].log_snr) / h
        out = out + (0.5 * t.alpha * phi2 / r0) * (m0 - x0s[-2])
    if t.sigma > 0.0:
        if noise is None:
            raise ValueError("dpmpp_sde_update needs noise unless the target level is clean")
        out = out + (t.sigma * math.sqrt(phi2)) * noise
    return out


def dpmpp_sample(denoise: Denoise, schedule: NoiseSchedule, x: ms.Tensor, rng: np.random.Generator, *,
                 steps: Optional[int] = None, timesteps: Optional[Sequence[int]] = None, spacing: str = "linspace",
                 steps_offset: int = 0, order: int = 2, lower_order_final: bool = True, karras: bool = False,
                 algorithm: str = "dpmsolver++", **loop_options) -> SampleResult:
    """DPM-Solver++ from x (B, C, H, W) in ``steps`` network evaluations (grid: ``dpmpp_grid``).

    ``order`` 1-3 (2 is the usual choice with guidance, 3 for unconditional sampling); the first
    steps use lower orders until enough history exists. ``lower_order_final`` (with fewer than 15
    steps) drops to order <= 2 on the second-to-last step; the last step is always first order.
    Deterministic: ``rng`` is only used for inpainting. Loop options: see ``samplers.loop``.
    ``algorithm="sde-dpmsolver++"``: the stochastic variant (orders 1-2, see ``dpmpp_sde_sample``).
    """
    if algorithm not in DPMPP_ALGORITHMS:
        raise ValueError(f"dpmpp: algorithm must be one of {DPMPP_ALGORITHMS}, got {algorithm!r}")
    sde = algorithm == "sde-dpmsolver++"
    orders = DPMPP_SDE_ORDERS if sde else DPMPP_ORDERS
    if order not in orders:
        raise ValueError(f"dpmpp{'_sde' if sde else ''}: order must be one of {orders}, got {order!r}")
    ts, levels = dpmpp_grid(schedule, steps, spacing, steps_offset, karras, timesteps)
    n = len(ts)
    loop = SamplingLoop(denoise, schedule, rng, name="SDE-DPM-Solver++" if sde else "DPM-Solver++", num_steps=n,
                        **loop_options)
    loop.start(x, int(ts[0]))
    x0s: List[ms.Tensor] = []
    warm = 0  # how many previous x0s the solver may use (diffusers' lower_order_nums)
    for i, t in enumerate(loop.steps(ts.tolist())):
        x = loop.inpaint(x, levels[i])
        x0 = loop.predict(x, t, levels[i])[1]
        x0s = (x0s + [x0])[-order:]
        last = i == n - 1
        k = min(order, warm + 1)
        if last:
            k = 1
        elif lower_order_final and n < 15 and i == n - 2:
            k = min(k, 2)
        if sde:
            noise = None if levels[i + 1].is_clean else gaussian(rng, x.shape, x.dtype)
            x = dpmpp_sde_update(x, x0s[-k:], levels[i + 1 - k:i + 2], noise)
        else:
            x = dpmpp_update(x, x0s[-k:], levels[i + 1 - k:i + 2])
        warm = min(warm + 1, order)
        loop.end_step(i, t, -1 if last else int(ts[i + 1]), x, x0)
    return loop.result(x)


def dpmpp_sde_sample(denoise: Denoise, schedule: NoiseSchedule, x: ms.Tensor, rng: np.random.Generator, *,
                     steps: Optional[int] = None, timesteps: Optional[Sequence[int]] = None,
                     spacing: str = "linspace", steps_offset: int = 0, order: int = 2, lower_order_final: bool = True,
                     karras: bool = False, **loop_options) -> SampleResult:
    """SDE-DPM-Solver++ (DPM++ 2M SDE for ``order=2``, the default; ``order=1`` is first order) from
    x (B, C, H, W) in ``steps`` network evaluations on ``dpmpp_grid``.

    As ``dpmpp_sample`` (same grid, warm-up, ``lower_order_final`` and final first-order step to clean
    data), plus noise: each step but the last adds sigma_t sqrt(1 - e^-2h) times one float32 standard
    normal draw of x's shape from ``rng``. Matches diffusers' ``DPMSolverMultistepScheduler(
    algorithm_type="sde-dpmsolver++", solver_type="midpoint")``. Loop options: see ``samplers.loop``.
    """
    return dpmpp_sample(denoise, schedule, x, rng, steps=steps, timesteps=timesteps, spacing=spacing,
                        steps_offset=steps_offset, order=order, lower_order_final=lower_order_final, karras=karras,
                        algorithm="sde-dpmsolver++", **loop_options)
