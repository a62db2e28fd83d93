"""The compiled denoiser the samplers call (contract: ``ms_diffusion.samplers.base``).

``make_denoiser`` returns ``denoise(x, t, x_self_cond=None, alpha_cumprod=None) -> (eps, x0[, log_var])``.
The network call, guidance, the conversion to (eps, x0) and clipping run as one jit-compiled graph
(``predict``), compiled once per ``DenoiserOptions`` and reused for every timestep: t, the level
coefficients and the guidance weights enter as tensors, cached per timestep.
"""
from __future__ import annotations

import math
from dataclasses import astuple, dataclass
from typing import Callable, Dict, Optional, Tuple, Union

import numpy as np
from mindspore import Tensor

from ms_diffusion.diffusion.guidance import check_guidance, guidance_batch, guide, split_halves
from ms_diffusion.diffusion.parameterization import output_to_eps_x0
from ms_diffusion.runtime import maybe_jit
from ms_diffusion.samplers.base import Denoise
from ms_diffusion.samplers.thresholding import check_threshold, clip_x0, resolve_clip

__all__ = ["DenoiserOptions", "denoiser_options", "predict", "compile_predict", "predict_preconditioned",
           "compile_predict_preconditioned", "timestep_level_inputs", "LevelCache", "make_denoiser"]


@dataclass(frozen=True)
class DenoiserOptions:
    """The denoiser graph's compile-time constants: a new value compiles a new graph.

    ``guided``: classifier-free guidance (2B batch); ``rescaled``: guidance rescale on; ``clip``:
    "none" / "static" / "dynamic" (``samplers.thresholding``) with ``threshold_ratio`` and
    ``sample_max_value``.
    """

    guided: bool = False
    rescaled: bool = False
    clip: str = "none"
    threshold_ratio: float = 0.995
    sample_max_value: float = 1.0

    def as_tuple(self) -> Tuple[bool, bool, str, float, float]:
        """The jit argument: a tuple of Python constants (hashable, specialises the graph)."""
        return astuple(self)


def denoiser_options(*, guidance_scale: float = 1.0, guidance_rescale: float = 0.0, conditional: bool = False,
                     clip_denoised: Optional[Union[bool, str]] = None, default_clip: Union[bool, str] = "none",
                     threshold_ratio: float = 0.995, sample_max_value: float = 1.0) -> DenoiserOptions:
    """Validated options; ``conditional``: a class-conditional network with classes to guide towards."""
    guided, rescaled = check_guidance(guidance_scale, guidance_rescale, conditional)
    clip = resolve_clip(clip_denoised, default_clip)
    if clip == "dynamic":
        check_threshold(threshold_ratio, sample_max_value)
    return DenoiserOptions(guided, rescaled, clip, float(threshold_ratio), float(sample_max_value))


def predict(diffusion, x, t, x_self_cond, cond, alpha, sigma, scale, phi, options):
    """The graph body: (eps, x0[, log_var]) of ``diffusion``'s network at (x, t).

    x (B, C, H, W) in model space, t (B,) int32, cond the network's conditioning (or None);
    alpha, sigma: 0-d tensors, the level x = alpha x0 + sigma eps; scale, phi: 0-d tensors, the
    guidance weight and rescale; ``options``: ``DenoiserOptions.as_tuple()``. The tensors are
    separate arguments because a tuple argument of a jit function is a constant (a new graph per
    value). Guidance acts on the mean prediction only; a learned variance comes from the
    conditional pass (GLIDE).
    """
    guided, rescaled, clip, threshold_ratio, sample_max_value = options
    out, var_frac = network_guided(diffusion, x, t, x_self_cond, cond, scale, phi, guided, rescaled)
    eps, x0 = output_to_eps_x0(diffusion.objective, x, out, alpha, sigma, clip, threshold_ratio, sample_max_value,
                               True)
    if var_frac is None:
        return eps, x0
    return eps, x0, diffusion.learned_log_variance(t, var_frac, x.ndim)


def network_guided(diffusion, x, time_input, x_self_cond, cond, scale, phi, guided, rescaled):
    """The network output (B, C', H, W) at (x, time_input) and the learned-variance part (or None), with
    classifier-free guidance on the mean part when ``guided`` (GLIDE: the variance of the conditional pass)."""
    if not guided:
        return diffusion.network_output(x, time_input, x_self_cond, cond)
    b = x.shape[0]
    x2, t2, sc2, cond2 = guidance_batch(x, time_input, x_self_cond, cond, diffusion.num_classes)
    out, var_frac = diffusion.network_output(x2, t2, sc2, cond2)
    cond_out, uncond_out = split_halves(out, b)
    return guide(cond_out, uncond_out, scale, phi, rescaled), None if var_frac is None else var_frac[:b]


def predict_preconditioned(diffusion, x, label, x_self_cond, cond, in_scale, skip, out_scale, alpha, sigma, scale,
                           phi, options):
    """The graph body of a continuous-time diffusion (EDM, flow matching): (eps, x0) at x = alpha x0 + sigma eps.

    The network sees ``in_scale * x`` and the noise label ``label`` (B,); its output F gives
    x0 = skip * x + out_scale * F (the objective's preconditioning expressed in model space, all 0-d
    tensors); x0 is clipped per ``options`` and eps re-derived from it. Guidance as ``predict``.
    """
    guided, rescaled, clip, threshold_ratio, sample_max_value = options
    out, _ = network_guided(diffusion, x * in_scale, label, x_self_cond, cond, scale, phi, guided, rescaled)
    x0 = skip * x + out_scale * out
    if clip != "none":
        x0 = clip_x0(x0, clip, threshold_ratio, sample_max_value)
    return (x - alpha * x0) / sigma, x0


def compile_predict_preconditioned(diffusion) -> Callable:
    """``predict_preconditioned`` of ``diffusion`` as one jit-compiled closure (see ``compile_predict``)."""

    def compiled_predict(x, label, x_self_cond, cond, in_scale, skip, out_scale, alpha, sigma, scale, phi, options):
        return predict_preconditioned(diffusion, x, label, x_self_cond, cond, in_scale, skip, out_scale, alpha, sigma,
                                      scale, phi, options)

    return maybe_jit(compiled_predict)


def compile_predict(diffusion) -> Callable:
    """``predict`` of ``diffusion`` as one jit-compiled function (a graph per distinct options / shapes).

    A closure, not ``ms.jit`` of a bound method: jit on a Cell's method makes MindSpore parse that
    method instead of ``construct`` wherever the Cell is later called inside another graph (e.g. the
    train step after sampling).
    """

    def compiled_predict(x, t, x_self_cond, cond, alpha, sigma, scale, phi, options):
        return predict(diffusion, x, t, x_self_cond, cond, alpha, sigma, scale, phi, options)

    return maybe_jit(compiled_predict)


def timestep_level_inputs(t: int, alpha_cumprod: float, batch_size: int) -> Tuple[np.ndarray, float, float]:
    """A discrete-time diffusion's graph inputs at a level: t (B,) int32, alpha, sigma."""
    return (np.full((batch_size,), t, np.int32), math.sqrt(alpha_cumprod), math.sqrt(1.0 - alpha_cumprod))


LevelInputs = Callable[[int, float, int], Tuple]


class LevelCache:
    """Per (timestep, alpha_cumprod) the graph's tensor inputs, from ``level_inputs(t, alpha_cumprod, B)``:
    the network's time input (B,) first, then 0-d float32 coefficients.

    ``alphas_cumprod`` (T,) float64; ``alpha_cumprod`` None means the schedule's level at t.
    """

    def __init__(self, batch_size: int, alphas_cumprod: np.ndarray, level_inputs: LevelInputs = timestep_level_inputs):
        self.batch_size = int(batch_size)
        self.alphas_cumprod = alphas_cumprod
        self.num_timesteps = int(alphas_cumprod.shape[0])
        self.level_inputs = level_inputs
        self._cache: Dict[Tuple[int, Optional[float]], Tuple[Tensor, ...]] = {}

    def __call__(self, t: int, alpha_cumprod: Optional[float] = None) -> Tuple[Tensor, ...]:
        key = (int(t), alpha_cumprod)
        if key not in self._cache:
            if not 0 <= key[0] < self.num_timesteps:
                raise ValueError(f"timestep {t} outside [0, {self.num_timesteps - 1}]")
            ac = float(self.alphas_cumprod[key[0]]) if alpha_cumprod is None else float(alpha_cumprod)
            time_input, *coefficients = self.level_inputs(key[0], ac, self.batch_size)
            self._cache[key] = (Tensor(time_input),) + tuple(Tensor(np.float32(c)) for c in coefficients)
        return self._cache[key]


def make_denoiser(compiled: Callable, batch_size: int, alphas_cumprod: np.ndarray, cond, options: DenoiserOptions,
                  guidance_scale: float = 1.0, guidance_rescale: float = 0.0,
                  level_inputs: LevelInputs = timestep_level_inputs) -> Denoise:
    """The samplers' ``denoise`` around ``compiled(x, time_input, x_self_cond, cond, *coefficients, scale, phi,
    options)``, the level's inputs from ``level_inputs`` (default: a discrete diffusion's t, alpha, sigma).

    ``compiled``: ``compile_predict(diffusion)`` (or ``compile_predict_preconditioned``), kept by the
    diffusion so its graphs are reused across calls; ``cond`` as the network takes it (already checked).
    """
    levels = LevelCache(batch_size, alphas_cumprod, level_inputs)
    scale, phi = Tensor(np.float32(guidance_scale)), Tensor(np.float32(guidance_rescale))
    consts = options.as_tuple()

    def denoise(x, t: int, x_self_cond=None, alpha_cumprod: Optional[float] = None):
        time_input, *coefficients = levels(t, alpha_cumprod)
        return compiled(x, time_input, x_self_cond, cond, *coefficients, scale, phi, consts)

    return denoise
