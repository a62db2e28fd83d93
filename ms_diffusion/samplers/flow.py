"""Flow-matching Euler (diffusers' ``FlowMatchEulerDiscreteScheduler``) on any schedule.

Every level x = alpha x0 + sigma eps of a schedule is a point of the straight path
x_f = (1 - t) x0 + t eps with t = sigma / (alpha + sigma) and x_f = x / (alpha + sigma). The sampler
integrates dx_f / dt = v = eps - x0 with Euler's method, x_f <- x_f + (t' - t) v, on the grid
t = flow_shift(linspace(t_max, t_min, steps), shift), t_max / t_min the schedule's noisiest and cleanest
flow times, and a last step to t = 0. For a flow-matching model (``diffusion.flow``) this is diffusers'
grid exactly -- including its shifting twice of the cleanest point (the table is shifted already) --
and the network sees 1000 t; for a discrete VP diffusion it is one more deterministic sampler (the
network sees the nearest training timestep). ``stochastic`` replaces the Euler step by
x_f' = (1 - t') x0 + t' z with fresh noise z (diffusers' ``stochastic_sampling``).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import mindspore as ms
import numpy as np

from ms_diffusion.samplers.base import Denoise, SampleResult, check_steps, gaussian
from ms_diffusion.samplers.levels import CLEAN, NoiseLevel
from ms_diffusion.samplers.loop import SamplingLoop
from ms_diffusion.schedules import NoiseSchedule, flow_shift

__all__ = ["flow_times", "flow_grid", "flow_euler_sample"]


def flow_times(schedule: NoiseSchedule) -> np.ndarray:
    """The flow time t = sigma / (alpha + sigma) of every level of the schedule, (T,) ascending."""
    abar = schedule.alphas_cumprod
    alpha, sigma = np.sqrt(abar), np.sqrt(1.0 - abar)
    return sigma / (alpha + sigma)


def flow_grid(schedule: NoiseSchedule, steps: Optional[int] = None, shift: float = 1.0
              ) -> Tuple[np.ndarray, List[float], List[NoiseLevel]]:
    """(network timesteps (S,) int64, flow times (S + 1) ending at 0, levels (S + 1) ending clean)."""
    if not shift > 0:
        raise ValueError(f"flow_euler: shift must be positive, got {shift}")
    steps = check_steps(steps, schedule.num_timesteps, "flow_euler")
    table = flow_times(schedule)
    times = flow_shift(np.linspace(table[-1], table[0], steps, dtype=np.float64), shift)
    net_ts = np.clip(np.rint(np.interp(times, table, np.arange(table.size))), 0, table.size - 1).astype(np.int64)
    levels = [NoiseLevel(float((1.0 - t) ** 2 / ((1.0 - t) ** 2 + t ** 2))) for t in times]
    return net_ts, [float(t) for t in times] + [0.0], levels + [CLEAN]


def flow_euler_sample(denoise: Denoise, schedule: NoiseSchedule, x: ms.Tensor, rng: np.random.Generator, *,
                      steps: Optional[int] = None, shift: float = 1.0, stochastic: bool = False,
                      **loop_options) -> SampleResult:
    """Flow-matching Euler from noise x (B, C, H, W) (model space ~N(0, 1)) in ``steps`` evaluations.

    Returns model-space samples; trajectory and callback see model space. ``rng`` draws the noise of
    ``stochastic`` steps (one float32 standard normal of x's shape per step but the last) and of
    inpainting. Loop options: see ``samplers.loop``.
    """
    ts, times, levels = flow_grid(schedule, steps, shift)
    loop = SamplingLoop(denoise, schedule, rng, name="Flow Euler", num_steps=len(ts), **loop_options)
    loop.start(x, int(ts[0]))
    xf = x * (1.0 / (levels[0].alpha + levels[0].sigma))
    for i, t in enumerate(loop.steps(ts.tolist())):
        level, scale = levels[i], levels[i].alpha + levels[i].sigma
        x_model = xf * scale
        if loop.mask is not None:
            x_model = loop.inpaint(x_model, level)
            xf = x_model * (1.0 / scale)
        eps, x0 = loop.predict(x_model, t, level)[:2]
        if stochastic and times[i + 1] > 0.0:
            xf = x0 * (1.0 - times[i + 1]) + gaussian(rng, x.shape, x.dtype) * times[i + 1]
        else:
            xf = xf + (eps - x0) * (times[i + 1] - times[i])
        nxt = levels[i + 1]
        loop.end_step(i, t, -1 if i == len(ts) - 1 else int(ts[i + 1]), xf * (nxt.alpha + nxt.sigma), x0)
    return loop.result(xf)
