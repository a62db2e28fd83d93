"""What every sampler shares: the denoiser contract, seeded host-side noise, trajectories.

A sampler is a function over ``(denoise, schedule)``:

* ``denoise(x, t, x_self_cond) -> (eps, x0)``: x (B, C, H, W) Tensor at integer timestep ``t``,
  the previous step's x0 estimate (or None) for self-conditioning; returns the noise and the
  clean-image estimates (x0 already clipped / thresholded if the caller wants that). Model
  parameterisation (eps / x0 / v), clipping and guidance live in the denoiser, not the sampler
  (see ``ms_diffusion.diffusion.gaussian.GaussianDiffusion.denoiser``).
* ``schedule``: a ``NoiseSchedule``; coefficients are computed in float64 on the host.

Noise comes from a ``numpy.random.Generator``, so a seed reproduces a sample exactly on any
device and in either execution mode.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import mindspore as ms
import numpy as np

Denoise = Callable[[ms.Tensor, int, Optional[ms.Tensor]], Tuple[ms.Tensor, ms.Tensor]]
StepCallback = Callable[[int, int, ms.Tensor, ms.Tensor], None]

__all__ = ["Denoise", "StepCallback", "SampleResult", "Trajectory", "make_rng", "gaussian"]


def make_rng(seed) -> np.random.Generator:
    """A numpy Generator from an int seed, an existing Generator, or None (fresh entropy)."""
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)


def gaussian(rng: np.random.Generator, shape: Sequence[int], dtype=ms.float32) -> ms.Tensor:
    """Standard normal noise of ``shape`` drawn on the host from ``rng``."""
    return ms.Tensor(rng.standard_normal(tuple(shape)).astype(np.float32), dtype)


@dataclass
class Trajectory:
    """Intermediate samples kept every ``every`` steps (and always the first and last)."""

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


def check_timesteps(timesteps: Sequence[int], num_timesteps: int) -> np.ndarray:
    ts = np.asarray(timesteps, dtype=np.int64)
    if ts.ndim != 1 or ts.size == 0:
        raise ValueError("timesteps must be a non-empty 1-D sequence")
    if ts.min() < 0 or ts.max() >= num_timesteps:
        raise ValueError(f"timesteps must lie in [0, {num_timesteps - 1}], got {ts.min()}..{ts.max()}")
    if np.any(np.diff(ts) >= 0):
        raise ValueError("timesteps must be strictly decreasing")
    return ts
