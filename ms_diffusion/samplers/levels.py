"""Noise levels of the variance-preserving process, x = alpha * x0 + sigma * eps, on the host in float64.

One helper for every sampler that reasons in (alpha, sigma, log-SNR) rather than in timestep
indices: DDIM / PLMS updates, DPM-Solver++ (which works in lambda = log(alpha / sigma)), Karras
sigma grids and DDIM inversion.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np

from ms_diffusion.schedules import NoiseSchedule, karras_sigma_ramp

__all__ = ["NoiseLevel", "CLEAN", "noise_level", "noise_levels", "karras_sigmas", "sigma_to_timestep", "karras_grid"]


@dataclass(frozen=True)
class NoiseLevel:
    """One point of the VP process: alpha_cumprod = alpha^2, alpha^2 + sigma^2 = 1."""

    alpha_cumprod: float

    def __post_init__(self):
        if not 0.0 <= self.alpha_cumprod <= 1.0:
            raise ValueError(f"alpha_cumprod must lie in [0, 1], got {self.alpha_cumprod}")

    @classmethod
    def from_ve_sigma(cls, sigma: float) -> "NoiseLevel":
        """The level whose variance-exploding sigma (sigma / alpha, Karras et al.) is ``sigma``."""
        return cls(1.0 / (1.0 + float(sigma) ** 2))

    @property
    def alpha(self) -> float:
        return math.sqrt(self.alpha_cumprod)

    @property
    def sigma(self) -> float:
        return math.sqrt(1.0 - self.alpha_cumprod)

    @property
    def ve_sigma(self) -> float:
        """sigma / alpha = sqrt((1 - abar) / abar); inf at zero SNR."""
        return math.inf if self.alpha_cumprod == 0.0 else math.sqrt((1.0 - self.alpha_cumprod) / self.alpha_cumprod)

    @property
    def log_snr(self) -> float:
        """lambda = log(alpha / sigma): +inf for clean data, -inf at zero SNR."""
        if self.alpha_cumprod == 1.0:
            return math.inf
        if self.alpha_cumprod == 0.0:
            return -math.inf
        return 0.5 * (math.log(self.alpha_cumprod) - math.log1p(-self.alpha_cumprod))

    @property
    def is_clean(self) -> bool:
        return self.alpha_cumprod == 1.0


CLEAN = NoiseLevel(1.0)


def noise_level(schedule: NoiseSchedule, t: int, final_alpha_cumprod: float = 1.0) -> NoiseLevel:
    """The level of timestep ``t``; ``t < 0`` means the end of sampling, at ``final_alpha_cumprod``."""
    return NoiseLevel(float(schedule.alphas_cumprod[t]) if t >= 0 else float(final_alpha_cumprod))


def noise_levels(schedule: NoiseSchedule, timesteps: Sequence[int], final_alpha_cumprod: float = 1.0
                 ) -> List[NoiseLevel]:
    return [noise_level(schedule, int(t), final_alpha_cumprod) for t in timesteps]


def karras_sigmas(schedule: NoiseSchedule, steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) sigmas, descending, (steps,): sigma_max and sigma_min of the schedule,
    evenly spaced in sigma^(1/rho) (diffusers' ``use_karras_sigmas``; variance-exploding sigmas)."""
    if schedule.has_zero_terminal_snr:
        raise ValueError("Karras sigmas need a finite sigma_max; the schedule has zero terminal SNR "
                         "(sigma_max = inf): sample without karras=True")
    abar = schedule.alphas_cumprod
    sigma_min = math.sqrt((1.0 - abar[0]) / abar[0])
    sigma_max = math.sqrt((1.0 - abar[-1]) / abar[-1])
    return karras_sigma_ramp(sigma_min, sigma_max, steps, rho)


def sigma_to_timestep(schedule: NoiseSchedule, sigma: float) -> float:
    """Fractional timestep of a variance-exploding sigma: linear interpolation in log sigma between
    the two neighbouring training timesteps (diffusers / k-diffusion ``_sigma_to_t``)."""
    abar = schedule.alphas_cumprod
    with np.errstate(divide="ignore"):
        log_sigmas = 0.5 * (np.log1p(-abar) - np.log(abar))
    log_sigma = math.log(max(float(sigma), 1e-10))
    T = log_sigmas.shape[0]
    low = int(np.clip(np.sum(log_sigmas <= log_sigma) - 1, 0, T - 2))
    w = (log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])
    w = float(np.clip(w, 0.0, 1.0))
    return (1.0 - w) * low + w * (low + 1)


def karras_grid(schedule: NoiseSchedule, steps: int, rho: float = 7.0) -> Tuple[np.ndarray, List[NoiseLevel]]:
    """(timesteps (steps,) int64, levels): Karras sigmas and the rounded timesteps the network sees."""
    sigmas = karras_sigmas(schedule, steps, rho)
    timesteps = np.array([round(sigma_to_timestep(schedule, s)) for s in sigmas], dtype=np.int64)
    return timesteps, [NoiseLevel.from_ve_sigma(s) for s in sigmas]
