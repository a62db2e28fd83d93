"""FlowMatching: rectified flow / conditional flow matching (Liu et al. 2022; Lipman et al. 2022; SD3, Esser et al.
2024).

    flow = FlowMatching(Unet(dim=32, dim_mults=(1, 2, 4), channels=1), image_size=28)
    loss = flow(images)                      # images (B, C, H, W) in [0, 1]
    samples = flow.sample(batch_size=16)     # flow-matching Euler, 32 steps

x_t = (1 - t) x0 + t eps for t in [0, 1]; the network predicts the velocity v = eps - x0 and is trained
with || F(x_t, 1000 t) - (eps - x0) ||^2. t is drawn uniform or logit-normal (SD3: sigmoid of
N(logit_mean, logit_std^2)), then shifted, t -> shift t / (1 + (shift - 1) t) (SD3's timestep shift,
1 = none), the same shift the sampling grid gets. The network's timestep input is 1000 t (SD3 / diffusers).

Sampling walks the table of diffusers' ``FlowMatchEulerDiscreteScheduler`` (t = shift(k / 1000),
k = 1..1000; zero SNR at t = 1). The default ``flow_euler`` sampler is x <- x + (t' - t) v on its grid;
DDIM, DDPM and the other samplers work on the same table as for any diffusion (x0 and eps from v);
Euler, Euler ancestral, Heun and PLMS, which cannot start at zero SNR, default to the ``leading`` grid.
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from ms_diffusion.diffusion.continuous import ContinuousDiffusion
from ms_diffusion.diffusion.gaussian_terms import elementwise_loss, mean_flat
from ms_diffusion.samplers.levels import NoiseLevel
from ms_diffusion.schedules import flow_shift, flow_time_table

__all__ = ["FlowMatching", "TIME_SAMPLINGS"]

TIME_SAMPLINGS = ("uniform", "logit_normal")

# samplers that cannot start at t = 1 (zero SNR: infinite VE sigma, or x0 not recoverable from eps) start on
# diffusers' "leading" grid, whose first level is just below it
_FROM_BELOW_ZERO_SNR = {name: {"spacing": "leading"} for name in ("euler", "euler_a", "heun", "plms")}


class FlowMatching(ContinuousDiffusion):
    """Flow-matching objective around a denoising network (``models.contract.DenoiserNetwork``).

    Images in [0, 1] (``auto_normalize``) or [-1, 1]; ``times`` of ``training_loss`` are t (B,) float32
    in [0, 1] (after the shift).
    """

    default_sampler = "flow_euler"

    def __init__(
        self,
        model: nn.Cell,
        *,
        image_size: Union[int, Sequence[int]],
        time_sampling: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        shift: float = 1.0,
        num_train_timesteps: int = 1000,
        sampling_timesteps: int = 32,
        auto_normalize: bool = True,
        clip_denoised: bool = False,
        offset_noise_strength: float = 0.0,
        immiscible: bool = False,
        loss_type: str = "l2",
    ):
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"unknown time_sampling {time_sampling!r}; choose one of {TIME_SAMPLINGS}")
        if shift <= 0 or logit_std <= 0:
            raise ValueError(f"shift and logit_std must be positive, got {shift}, {logit_std}")
        if num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
        super().__init__(model, image_size=image_size, schedule=flow_time_table(int(num_train_timesteps), shift),
                         sampling_timesteps=sampling_timesteps, auto_normalize=auto_normalize,
                         clip_denoised=clip_denoised, offset_noise_strength=offset_noise_strength,
                         immiscible=immiscible, loss_type=loss_type,
                         sampler_defaults=dict({"flow_euler": {"shift": float(shift)}}, **_FROM_BELOW_ZERO_SNR))
        self.time_sampling = time_sampling
        self.logit_mean, self.logit_std = float(logit_mean), float(logit_std)
        self.shift = float(shift)
        self.num_train_timesteps = int(num_train_timesteps)

    def noisy(self, x0, noise, times):
        return (1.0 - times) * x0 + times * noise

    def preconditioning(self, times, log):
        return 1.0, times * float(self.num_train_timesteps), 1.0, -times

    def per_sample_loss(self, x0, noise, x0_hat, out, times):
        return mean_flat(elementwise_loss(out, noise - x0, self.loss_type))

    def draw_times(self, rng: np.random.Generator, batch_size: int) -> np.ndarray:
        """t (B,) float32: uniform in [0, 1) or sigmoid(N(logit_mean, logit_std^2)), then shifted."""
        if self.time_sampling == "uniform":
            t = rng.random(batch_size)
        else:
            t = 1.0 / (1.0 + np.exp(-(self.logit_mean + self.logit_std * rng.standard_normal(batch_size))))
        return flow_shift(t, self.shift).astype(np.float32)

    def draw_times_in_graph(self, batch_size: int) -> Tensor:
        if self.time_sampling == "uniform":
            t = ops.uniform((batch_size,), Tensor(0.0, ms.float32), Tensor(1.0, ms.float32))
        else:
            t = ops.sigmoid(self.logit_mean + self.logit_std * ops.standard_normal((batch_size,)))
        return flow_shift(t, self.shift).astype(ms.float32)

    def native_level(self, level: NoiseLevel) -> Tuple[float, float]:
        """(t = sigma / (alpha + sigma), 1 / (alpha + sigma)): (1 - t) x0 + t eps = model-space x / (alpha + sigma)."""
        total = level.alpha + level.sigma
        return level.sigma / total, 1.0 / total
