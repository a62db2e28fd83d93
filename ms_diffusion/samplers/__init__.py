"""Samplers: pure loops over a denoiser ``(x, t, x_self_cond) -> (eps, x0)`` and a NoiseSchedule.

``run_sampler(name, ...)`` is the one entry point the diffusion classes and ``sample.py`` use;
``SAMPLER_NAMES`` lists the samplers it runs (noise -> data). ``ddim_invert`` runs the other way
(data -> noise) for editing. The contract every sampler relies on is in ``samplers.base``, the
options every sampler shares (self-conditioning, inpainting, trajectory, callback, progress) in
``samplers.loop``.

========= =================================================== ========================================
name      sampler                                             options beyond the loop's
========= =================================================== ========================================
ddpm      ancestral DDPM, all T steps or a subset              steps, timesteps, spacing, steps_offset,
                                                              temperature, noise_dropout
ddim      DDIM                                                steps, timesteps, prev_timesteps, spacing,
                                                              steps_offset, eta, final_alpha_cumprod,
                                                              temperature, noise_dropout
plms      PLMS (ldm) = PNDM with skip_prk_steps (diffusers)   steps, timesteps, prev_timesteps, spacing,
                                                              steps_offset, final_alpha_cumprod
dpmpp     DPM-Solver++ multistep                              steps, timesteps, spacing, steps_offset,
                                                              order, lower_order_final, karras, algorithm
dpmpp_sde SDE-DPM-Solver++ multistep, orders 1-2 (DPM++ 2M   steps, timesteps, spacing, steps_offset,
          SDE; sde-dpmsolver++), noise from the rng           order, lower_order_final, karras
euler     Euler on the probability-flow ODE in sigma space    steps, timesteps, spacing, steps_offset,
          (k-diffusion; diffusers EulerDiscreteScheduler)     karras, s_churn, s_tmin, s_tmax, s_noise
euler_a   Euler ancestral (EulerAncestralDiscreteScheduler)   steps, timesteps, spacing, steps_offset,
                                                              karras
heun      Heun, 2 evaluations per step but the last           steps, timesteps, spacing, steps_offset,
          (HeunDiscreteScheduler; EDM Algorithm 1 / 2)        karras, s_churn, s_tmin, s_tmax, s_noise
unipc     UniPC multistep predictor-corrector, orders 1-3     steps, timesteps, spacing, steps_offset,
          (UniPCMultistepScheduler, bh1 / bh2)                order, solver_type, lower_order_final,
                                                              disable_corrector, karras
flow_     flow-matching Euler on the straight path             steps, shift, stochastic
euler     (FlowMatchEulerDiscreteScheduler)
========= =================================================== ========================================
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Optional, Tuple

import mindspore as ms
import numpy as np

from ms_diffusion.samplers.base import Denoise, SampleResult, Trajectory, gaussian, make_rng
from ms_diffusion.samplers.ddim import ddim_grid, ddim_sample
from ms_diffusion.samplers.ddpm import ddpm_sample, ddpm_timesteps
from ms_diffusion.samplers.dpm_solver import dpmpp_grid, dpmpp_sample, dpmpp_sde_sample
from ms_diffusion.samplers.euler import euler_ancestral_sample, euler_sample, sigma_grid
from ms_diffusion.samplers.flow import flow_euler_sample
from ms_diffusion.samplers.heun import heun_sample
from ms_diffusion.samplers.inversion import ddim_invert
from ms_diffusion.samplers.levels import NoiseLevel
from ms_diffusion.samplers.loop import LOOP_OPTIONS
from ms_diffusion.samplers.plms import plms_sample
from ms_diffusion.samplers.thresholding import CLIP_MODES, clip_x0, resolve_clip
from ms_diffusion.samplers.unipc import unipc_sample
from ms_diffusion.schedules import NoiseSchedule

__all__ = ["SAMPLER_NAMES", "SAMPLER_ALIASES", "run_sampler", "sampler_options", "sampler_grid", "resolve_sampler",
           "ddpm_sample", "ddim_sample", "plms_sample", "dpmpp_sample", "dpmpp_sde_sample", "euler_sample",
           "euler_ancestral_sample", "heun_sample", "unipc_sample", "flow_euler_sample", "ddim_invert",
           "SampleResult", "Trajectory", "NoiseLevel", "make_rng", "gaussian", "CLIP_MODES", "clip_x0", "resolve_clip"]

_SAMPLERS: Dict[str, Callable[..., SampleResult]] = {
    "ddpm": ddpm_sample,
    "ddim": ddim_sample,
    "plms": plms_sample,
    "dpmpp": dpmpp_sample,
    "dpmpp_sde": dpmpp_sde_sample,
    "euler": euler_sample,
    "euler_a": euler_ancestral_sample,
    "heun": heun_sample,
    "unipc": unipc_sample,
    "flow_euler": flow_euler_sample,
}
SAMPLER_NAMES = tuple(_SAMPLERS)
SAMPLER_ALIASES = {"pndm": "plms", "dpm++": "dpmpp", "dpmsolver++": "dpmpp", "dpm_solver++": "dpmpp",
                   "dpm-solver++": "dpmpp", "dpmpp_2m_sde": "dpmpp_sde", "sde-dpmsolver++": "dpmpp_sde",
                   "euler_ancestral": "euler_a", "euler-a": "euler_a",
                   "uni_pc": "unipc", "unipc_multistep": "unipc", "flow": "flow_euler",
                   "flow_match_euler": "flow_euler", "flowmatch_euler": "flow_euler"}


def resolve_sampler(name: str) -> str:
    """The canonical sampler name for ``name`` (case-insensitive, aliases allowed); ValueError if unknown."""
    key = str(name).lower()
    key = SAMPLER_ALIASES.get(key, key)
    if key not in _SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {SAMPLER_NAMES} "
                         f"(aliases: {', '.join(sorted(SAMPLER_ALIASES))})")
    return key


def sampler_options(name: str) -> tuple:
    """The keyword options sampler ``name`` accepts (its own and the shared loop options)."""
    fn = _SAMPLERS[resolve_sampler(name)]
    own = [p.name for p in inspect.signature(fn).parameters.values()
           if p.kind == inspect.Parameter.KEYWORD_ONLY]
    return tuple(own) + LOOP_OPTIONS


def sampler_grid(name: str, schedule: NoiseSchedule, steps: int, **options: Any
                 ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(timesteps (S,) int64, prev_timesteps (S,) or None): the grid sampler ``name`` visits with ``steps`` steps
    and its grid options among ``options`` (``spacing``, ``steps_offset``, ``karras``; the sampler's defaults for
    the rest, other options ignored). Image-to-image enters it part-way through the ``timesteps`` (and
    ``prev_timesteps``) options. Fractional grids (Euler / Heun with ``linspace`` spacing or Karras sigmas)
    round to the timesteps the network sees."""
    key = resolve_sampler(name)
    defaults = {p.name: p.default for p in inspect.signature(_SAMPLERS[key]).parameters.values()
                if p.default is not inspect.Parameter.empty}
    o = {**defaults, **options}
    T = schedule.num_timesteps
    if key in ("ddim", "plms"):
        return ddim_grid(T, steps, o["spacing"], o["steps_offset"], sampler=key)
    if key == "ddpm":
        return ddpm_timesteps(T, steps, o["spacing"], o["steps_offset"]), None
    if key in ("dpmpp", "dpmpp_sde", "unipc"):
        return dpmpp_grid(schedule, steps, o["spacing"], o["steps_offset"], o["karras"])[0], None
    if key in ("euler", "euler_a", "heun"):
        return sigma_grid(schedule, steps, o["spacing"], o["steps_offset"], o["karras"], name=key)[0], None
    raise ValueError(f"sampler {key!r} takes no explicit timesteps, so it cannot start part-way along its grid")


def run_sampler(name: str, denoise: Denoise, schedule: NoiseSchedule, x: ms.Tensor, rng: np.random.Generator,
                **options: Any) -> SampleResult:
    """Sample with sampler ``name`` from noise ``x`` (B, C, H, W); returns the result in model space.

    ``options`` are the sampler's keyword arguments (see the table in this module's docstring and
    each sampler's docstring); an option the sampler does not take is a ValueError naming it.
    """
    key = resolve_sampler(name)
    allowed = sampler_options(key)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"sampler {key!r} does not take option(s) {unknown}; it takes {sorted(allowed)}")
    return _SAMPLERS[key](denoise, schedule, x, rng, **options)
