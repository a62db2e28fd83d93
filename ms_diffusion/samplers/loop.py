"""The bookkeeping every sampler shares: self-conditioning, inpainting, trajectory, callback, progress bar.

A sampler owns its update rule; ``SamplingLoop`` owns everything around it, so every sampler
takes the same *loop options* (keyword arguments of ``SamplingLoop``):

* ``self_condition``: pass the previous x0 estimate to the denoiser (lucidrains self-conditioning).
* ``mask``, ``x0``: inpainting with ldm's semantics. ``x0`` (B, C, H, W) is the known image in model
  space, ``mask`` (broadcastable to it) is 1 where x0 is kept; before every step the kept region is
  replaced by x0 noised to the current level (q_sample with fresh noise from ``rng``).
  ``mask_noise`` (B, C, H, W): noise x0 with this fixed noise at every level instead (diffusers'
  inpainting pipeline for ordinary models reuses its initial noise); ``mask_from_step``: the first step
  whose input is replaced (default 0; that pipeline starts from pure noise at full strength: 1).
* ``log_every_t``: keep every n-th step in ``SampleResult.trajectory`` (0: only the final sample).
* ``callback(i, t, x, x0)``: called after step i (which evaluated timestep t) with the new sample
  and the x0 estimate that step used.
* ``progress``: a tqdm bar.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Optional, Tuple, TypeVar, Union

import mindspore as ms
import numpy as np
from tqdm.auto import tqdm

from ms_diffusion.samplers.base import Denoise, SampleResult, StepCallback, Trajectory, gaussian
from ms_diffusion.samplers.levels import NoiseLevel
from ms_diffusion.schedules import NoiseSchedule

__all__ = ["SamplingLoop", "LOOP_OPTIONS"]

LOOP_OPTIONS = ("self_condition", "mask", "x0", "mask_noise", "mask_from_step", "log_every_t", "callback",
                "progress")

_T = TypeVar("_T")


def _as_tensor(a: Union[ms.Tensor, np.ndarray]) -> ms.Tensor:
    if isinstance(a, ms.Tensor):
        return a.astype(ms.float32)
    return ms.Tensor(np.asarray(a, dtype=np.float32))


class SamplingLoop:
    """Per-run state around a sampler's update rule (see the module docstring for the options)."""

    def __init__(self, denoise: Denoise, schedule: NoiseSchedule, rng: Optional[np.random.Generator], *, name: str,
                 num_steps: int, self_condition: bool = False,
                 mask: Optional[Union[ms.Tensor, np.ndarray]] = None,
                 x0: Optional[Union[ms.Tensor, np.ndarray]] = None,
                 mask_noise: Optional[Union[ms.Tensor, np.ndarray]] = None, mask_from_step: int = 0,
                 log_every_t: int = 0, callback: Optional[StepCallback] = None, progress: bool = False):
        if (mask is None) != (x0 is None):
            raise ValueError("inpainting needs both `mask` and `x0` (the known image), or neither")
        if mask is None and (mask_noise is not None or mask_from_step):
            raise ValueError("mask_noise / mask_from_step are inpainting options: pass mask and x0 too")
        if mask_from_step < 0:
            raise ValueError(f"mask_from_step must be >= 0, got {mask_from_step}")
        if mask is not None and rng is None:
            raise ValueError(f"{name} does not support inpainting (mask / x0)")
        if log_every_t < 0:
            raise ValueError(f"log_every_t must be >= 0, got {log_every_t}")
        self.denoise = denoise
        self.schedule = schedule
        self.rng = rng
        self.name = name
        self.num_steps = int(num_steps)
        self.self_condition = bool(self_condition)
        self.mask = None if mask is None else _as_tensor(mask)
        self.known = None if x0 is None else _as_tensor(x0)
        self.mask_noise = None if mask_noise is None else _as_tensor(mask_noise)
        self.mask_from_step = int(mask_from_step)
        self._inpaint_step = 0
        self.callback = callback
        self.progress = bool(progress)
        self.trajectory = Trajectory(every=int(log_every_t))
        self.last_x0: Optional[ms.Tensor] = None

    def start(self, x: ms.Tensor, t: int) -> None:
        """Record the starting sample x (B, C, H, W) at timestep t; checks the inpainting shapes."""
        if self.known is not None:
            for what, a in (("x0", self.known), ("mask_noise", self.mask_noise)):
                if a is not None and tuple(a.shape) != tuple(x.shape):
                    raise ValueError(f"inpainting {what} has shape {tuple(a.shape)} but the sample is "
                                     f"{tuple(x.shape)}")
            try:
                np.broadcast_shapes(tuple(self.mask.shape), tuple(x.shape))
            except ValueError:
                raise ValueError(f"mask of shape {tuple(self.mask.shape)} does not broadcast to the sample's "
                                 f"{tuple(x.shape)}") from None
        self.trajectory.record(0, self.num_steps + 1, t, x, None)

    def steps(self, items: Iterable[_T]) -> Iterator[_T]:
        """``items`` (one per step) behind an optional progress bar."""
        return iter(tqdm(list(items), desc=self.name, disable=not self.progress, leave=False))

    def predict(self, x: ms.Tensor, t: int, level: Optional[NoiseLevel] = None) -> Tuple[ms.Tensor, ...]:
        """The denoiser at (x, t), self-conditioned on the last x0; ``level`` overrides abar[t] for the
        conversion of the network output (see ``samplers.base``)."""
        sc = self.last_x0 if self.self_condition else None
        if level is None or level.alpha_cumprod == float(self.schedule.alphas_cumprod[t]):
            out = self.denoise(x, int(t), sc)
        else:
            out = self.denoise(x, int(t), sc, alpha_cumprod=level.alpha_cumprod)
        self.last_x0 = out[1]
        return out

    def inpaint(self, x: ms.Tensor, level: NoiseLevel) -> ms.Tensor:
        """Inpainting, called once before every step: the kept region of x replaced by the known image noised
        to ``level`` (from step ``mask_from_step`` on)."""
        if self.mask is None:
            return x
        step, self._inpaint_step = self._inpaint_step, self._inpaint_step + 1
        if step < self.mask_from_step:
            return x
        noise = self.mask_noise
        if noise is None and level.sigma != 0.0:
            noise = gaussian(self.rng, x.shape, x.dtype)
        known = self.known if level.sigma == 0.0 else level.alpha * self.known + level.sigma * noise
        return known * self.mask + (1.0 - self.mask) * x

    def end_step(self, i: int, t: int, t_to: int, x: ms.Tensor, x0: Optional[ms.Tensor]) -> None:
        """After step i (which evaluated t and jumped to t_to): trajectory and callback."""
        self.trajectory.record(i + 1, self.num_steps + 1, t_to, x, x0)
        if self.callback is not None:
            self.callback(i, int(t), x, x0)

    def result(self, x: ms.Tensor) -> SampleResult:
        return SampleResult(x, self.trajectory)
