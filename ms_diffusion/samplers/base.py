"""What every sampler shares: the denoiser contract, seeded host-side noise, trajectories.

A sampler is a function over ``(denoise, schedule)``:

* ``denoise(x, t, x_self_cond, alpha_cumprod=None) -> (eps, x0[, log_var])``: x (B, C, H, W) Tensor at
  integer timestep ``t``, the previous step's x0 estimate (or None) for self-conditioning; returns the
  noise and clean-image estimates, each (B, C, H, W) (x0 already clipped / thresholded if the caller
  wants that, eps then re-derived from it), and optionally a learned log-variance (B, C, H, W) of
  the one-step posterior at t. Model parameterisation (eps / x0 / v), clipping and guidance live in
  the denoiser, not the sampler (see ``ms_diffusion.diffusion.gaussian.GaussianDiffusion.denoiser``).

  ``alpha_cumprod`` (optional keyword): the network is still evaluated at timestep ``t`` but its
  output is converted to (eps, x0) as if x were at noise level ``alpha_cumprod`` instead of
  ``schedule.alphas_cumprod[t]``. Only DPM-Solver++ with Karras sigmas and DDIM inversion pass it
  (diffusers' semantics); a denoiser without it works with every other sampler.
* ``schedule``: a ``NoiseSchedule``; coefficients are computed in float64 on the host and enter the
  update arithmetic as Python floats.

Noise comes from a ``numpy.random.Generator``, so a seed reproduces a sample exactly on any
device and in either execution mode.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import mindspore as ms
import numpy as np

Denoise = Callable[..., Tuple[ms.Tensor, ...]]
StepCallback = Callable[[int, int, ms.Tensor, ms.Tensor], None]

__all__ = ["Denoise", "StepCallback", "SampleResult", "Trajectory", "make_rng", "gaussian", "step_noise",
           "check_timesteps", "check_steps"]


def make_rng(seed) -> np.random.Generator:
    """A numpy Generator from an int seed, an existing Generator, or None (fresh entropy)."""
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)


def gaussian(rng: np.random.Generator, shape: Sequence[int], dtype=ms.float32) -> ms.Tensor:
    """Standard normal noise of ``shape`` drawn on the host from ``rng``."""
    return ms.Tensor(rng.standard_normal(tuple(shape)).astype(np.float32), dtype)


def step_noise(rng: np.random.Generator, shape: Sequence[int], temperature: float = 1.0,
               noise_dropout: float = 0.0, dtype=ms.float32) -> ms.Tensor:
    """The per-step noise of a stochastic sampler, with ldm's ``temperature`` and ``noise_dropout``.

    One standard normal draw of ``shape`` times ``temperature``; with ``noise_dropout`` = p > 0 a
    second draw (uniforms) zeroes each entry with probability p and scales the rest by 1 / (1 - p),
    as ``torch.nn.functional.dropout`` does in ldm's samplers.
    """
    z = rng.standard_normal(tuple(shape))
    if temperature != 1.0:
        z = z * temperature
    if noise_dropout > 0.0:
        keep = rng.random(tuple(shape)) >= noise_dropout
        z = np.where(keep, z / (1.0 - noise_dropout), 0.0)
    return ms.Tensor(z.astype(np.float32), dtype)


def check_noise_options(temperature: float, noise_dropout: float) -> None:
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 <= noise_dropout < 1.0:
        raise ValueError(f"noise_dropout must lie in [0, 1), got {noise_dropout}")


@dataclass
class Trajectory:
    """Intermediate samples (numpy, (B, C, H, W) each) kept every ``every`` steps, always the first and last.

    ``xs[k]`` is the sample after ``k`` steps (``xs[0]`` the starting noise), ``x0s[k]`` the clean-image
    estimate that step used, ``timesteps[k]`` the timestep the step jumped to.
    """

    every: int = 0
    xs: List[np.ndarray] = field(default_factory=list)
    x0s: List[np.ndarray] = field(default_factory=list)
    timesteps: List[int] = field(default_factory=list)

    @property
    def enabled(self) -> bool:
        return self.every > 0

    def record(self, index: int, total: int, t: int, x: ms.Tensor, x0: Optional[ms.Tensor]) -> None:
        if not self.enabled or not (index % self.every == 0 or index == total - 1):
            return
        self.xs.append(x.asnumpy())
        self.x0s.append(x0.asnumpy() if x0 is not None else x.asnumpy())
        self.timesteps.append(int(t))


@dataclass
class SampleResult:
    """The final sample (B, C, H, W) in model space ([-1, 1] for images) and the trajectory."""

    sample: ms.Tensor
    trajectory: Trajectory


def check_timesteps(timesteps: Sequence[int], num_timesteps: int, descending: bool = True) -> np.ndarray:
    """``timesteps`` as int64, validated: 1-D, non-empty, in [0, T), strictly monotonic."""
    ts = np.asarray(timesteps, dtype=np.int64)
    if ts.ndim != 1 or ts.size == 0:
        raise ValueError("timesteps must be a non-empty 1-D sequence")
    if ts.min() < 0 or ts.max() >= num_timesteps:
        raise ValueError(f"timesteps must lie in [0, {num_timesteps - 1}], got {ts.min()}..{ts.max()}")
    steps = np.diff(ts)
    if np.any(steps >= 0 if descending else steps <= 0):
        raise ValueError(f"timesteps must be strictly {'decreasing' if descending else 'increasing'}")
    return ts


def check_steps(steps: Optional[int], num_timesteps: int, sampler: str) -> int:
    """``steps`` (None: all T) validated against the schedule's T."""
    if steps is None:
        return num_timesteps
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= num_timesteps:
        raise ValueError(f"{sampler}: steps must be an integer in [1, {num_timesteps}] (the training timesteps), "
                         f"got {steps!r}")
    return int(steps)
