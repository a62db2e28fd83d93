"""ContinuousDiffusion: what EDM and flow matching share -- a network trained at continuous noise levels
behind a preconditioning, sampled by the samplers over a table of those levels.

Each objective works in its own space ("native" x: x0 + sigma eps for EDM, (1 - t) x0 + t eps for flow
matching), parameterised by one scalar per sample (``times``: sigma, or t). The subclass provides

* ``noisy(x0, noise, times)``: the native noisy sample;
* ``preconditioning(times, log)``: (in_scale, label, skip, out_scale) -- the network sees
  ``in_scale * x`` and the noise label, and x0 = skip * x + out_scale * F of its output F. Written
  once for tensors (training, ``log`` = ``ops.log``) and floats (sampling, ``math.log``);
* ``per_sample_loss(x0, noise, x0_hat, out, times)``: the (B,) training loss from the clean batch, the
  noise, the network's x0 estimate and its raw output F;
* ``draw_times`` / ``draw_times_in_graph``: the training distribution of ``times``;
* ``native_level(level)``: (times, native x / model-space x) of a sampling level.

The samplers walk ``schedule``, a ``NoiseSchedule`` table of the objective's levels (index 0 the
least noisy), in model space x = alpha x0 + sigma eps; the denoiser maps a level to the
preconditioning coefficients on the host, so the network always sees the exact level the sampler
asks for, whatever the table's resolution.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
from mindspore import Tensor, nn, ops

from ms_diffusion.diffusion.base import ImageDiffusion
from ms_diffusion.diffusion.denoiser import compile_predict_preconditioned
from ms_diffusion.diffusion.gaussian_terms import check_loss_type
from ms_diffusion.nn.layers import to_float32
from ms_diffusion.samplers import resolve_sampler, sampler_options
from ms_diffusion.samplers.levels import NoiseLevel
from ms_diffusion.schedules import NoiseSchedule

__all__ = ["ContinuousDiffusion"]


class ContinuousDiffusion(ImageDiffusion):
    """Base of ``EDMDiffusion`` and ``FlowMatching`` (see the module docstring for the subclass hooks)."""

    default_sampler: str = "euler"

    def __init__(self, model: nn.Cell, *, image_size: Union[int, Sequence[int]], schedule: NoiseSchedule,
                 sampling_timesteps: int, auto_normalize: bool = True, clip_denoised: Union[bool, str] = False,
                 offset_noise_strength: float = 0.0, immiscible: bool = False, loss_type: str = "l2",
                 sampler_defaults: Optional[Dict[str, Dict]] = None):
        check_loss_type(loss_type)
        super().__init__(model, image_size, auto_normalize)
        if int(model.out_dim) != self.channels:
            raise ValueError(f"the model outputs {model.out_dim} channels for {self.channels}-channel images; "
                             f"{type(self).__name__} needs out_dim == channels (no learned variance)")
        self.schedule = schedule
        self.num_timesteps = schedule.num_timesteps
        self.sampling_timesteps = int(sampling_timesteps)
        if self.sampling_timesteps < 1:
            raise ValueError(f"sampling_timesteps must be >= 1, got {sampling_timesteps}")
        self.clip_denoised = clip_denoised
        self.offset_noise_strength = float(offset_noise_strength)
        self.immiscible = bool(immiscible)
        self.loss_type = loss_type
        self.sampler_defaults = dict(sampler_defaults or {})

    # ------------------------------------------------------------------ subclass hooks

    def noisy(self, x0, noise, times):
        raise NotImplementedError

    def preconditioning(self, times, log):
        raise NotImplementedError

    def per_sample_loss(self, x0, noise, x0_hat, out, times):
        raise NotImplementedError

    def draw_times(self, rng: np.random.Generator, batch_size: int) -> np.ndarray:
        raise NotImplementedError

    def draw_times_in_graph(self, batch_size: int) -> Tensor:
        raise NotImplementedError

    def native_level(self, level: NoiseLevel) -> Tuple[float, float]:
        raise NotImplementedError

    # ------------------------------------------------------------------ the network

    def network_output(self, x, label, x_self_cond=None, cond=None):
        """The network at (preconditioned x, noise label (B,)): (F (B, C, H, W) float32, None)."""
        return to_float32(self.model(x, label, x_self_cond, cond)), None

    def denoised(self, x, times, x_self_cond=None, classes=None):
        """(x0 estimate, network output F) at native x (B, C, H, W) and ``times`` (B,) float32."""
        t = times.reshape((-1,) + (1,) * (x.ndim - 1))
        in_scale, label, skip, out_scale = self.preconditioning(t, ops.log)
        out, _ = self.network_output(x * in_scale, label.reshape(-1), x_self_cond, classes)
        return skip * x + out_scale * out, out

    # ------------------------------------------------------------------ training

    def p_losses(self, x0, times, noise, classes=None, self_cond: bool = False, loss_reduction: str = "mean"):
        """Loss of one batch: x0 (B, C, H, W) in model space, ``times`` (B,) float32, noise like x0."""
        x = self.noisy(x0, noise, times.reshape((-1,) + (1,) * (x0.ndim - 1)))
        x_self_cond = None
        if self.self_condition and self_cond:
            x_self_cond = ops.stop_gradient(self.denoised(x, times, None, classes)[0])
        x0_hat, out = self.denoised(x, times, x_self_cond, classes)
        loss = self.per_sample_loss(x0, noise, x0_hat, out, times.reshape((-1,) + (1,) * (x0.ndim - 1)))
        return loss if loss_reduction == "none" else loss.mean()

    def construct(self, img, classes=None, times=None, noise=None, self_cond=None, cond_drop_prob=None,
                  loss_reduction: str = "mean"):
        """Training loss of a batch of images (B, C, H, W) in [0, 1] (or [-1, 1] without auto_normalize).

        Missing ``times`` (B,) float32, ``noise`` and ``self_cond`` are drawn in the graph; ``classes``
        (B,) int are dropped to the null class with probability ``cond_drop_prob`` (default: the model's).
        """
        self.check_images(img.shape)
        x0 = self.normalize(img)
        times, noise, self_cond, classes = self._complete_inputs(x0, classes, times, noise, self_cond, cond_drop_prob)
        return self.p_losses(x0, times, noise, classes, self_cond, loss_reduction)

    def training_loss(self, images, *, times, noise, classes=None, self_cond: bool = False, posterior_noise=None,
                      loss_reduction: str = "mean"):
        """Loss of a batch whose randomness was drawn on the host (``training_inputs``); graph-safe.

        images (B, C, H, W) in [0, 1] (or [-1, 1] without auto_normalize); ``times`` (B,) float32;
        ``noise`` like images; ``classes`` (B,) int32 after label dropout, or None.
        """
        if posterior_noise is not None:
            raise ValueError("posterior_noise is only used by a latent diffusion")
        self.check_images(images.shape)
        return self.p_losses(self.normalize(images), times, noise, classes, self_cond, loss_reduction)

    # ------------------------------------------------------------------ sampling

    def level_inputs(self, t: int, alpha_cumprod: float, batch_size: int) -> Tuple:
        """The denoiser graph's inputs at a level: label (B,) float32, in_scale, skip, out_scale, alpha, sigma
        (model-space coefficients: native x = k * model-space x). The network sees the exact level; guidance
        combines its outputs F."""
        level = NoiseLevel(alpha_cumprod)
        times, k = self.native_level(level)
        in_scale, label, skip, out_scale = self.preconditioning(times, math.log)
        return (np.full((batch_size,), label, np.float32), in_scale * k, skip * k, out_scale, level.alpha,
                level.sigma)

    def _compile_predict(self):
        return compile_predict_preconditioned(self)

    def sampling_plan(self, sampler: Optional[str] = None, steps: Optional[int] = None) -> Tuple[str, int]:
        """(canonical sampler name, steps): default ``default_sampler`` with ``sampling_timesteps`` steps
        (DDPM: every level of the table)."""
        name = resolve_sampler(sampler or self.default_sampler)
        if steps is None:
            steps = self.sampling_timesteps if name != "ddpm" else self.num_timesteps
        return name, steps

    def _sampler_options(self, name: str, eta: Optional[float], options: Dict) -> Dict:
        """The objective's defaults for sampler ``name`` (``sampler_defaults``, e.g. EDM's Karras sigmas) where
        the sampler takes them, then ``eta`` and the caller's options."""
        taken = sampler_options(name)
        merged = {k: v for k, v in self.sampler_defaults.get(name, self.sampler_defaults.get("*", {})).items()
                  if k in taken}
        if eta is not None:
            merged["eta"] = eta
        merged.update(options)
        return super()._sampler_options(name, eta, merged)
