"""Noise-schedule math: beta schedules, every derived array, loss weights, timestep spacings.

numpy only, float64. This module is the single source of truth for schedule math; the
diffusion objectives and samplers read their coefficients from here and cast to float32 at
the last moment.

Conventions the anchors disagree on are explicit names, never silent:

=================  ==============================================  ==========================
name               betas                                            anchor
=================  ==============================================  ==========================
``linear``         linspace(s*1e-4, s*0.02), s = 1000/T             lucidrains ``linear``
``scaled_linear``  linspace(sqrt(start), sqrt(end)) ** 2            diffusers ``scaled_linear``
``ldm_linear``     same as ``scaled_linear``                        ldm ``linear``
``sqrt_linear``    linspace(start, end)                             ldm ``sqrt_linear``,
                                                                    diffusers ``linear``
``sqrt``           linspace(start, end) ** 0.5                      ldm ``sqrt``
``cosine``         Nichol & Dhariwal, s=0.008, clipped at 0.999     lucidrains / ldm / diffusers
                                                                    ``squaredcos_cap_v2``
``sigmoid``        Jabri et al. (start=-3, end=3, tau=1)            lucidrains ``sigmoid``
=================  ==============================================  ==========================
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "BETA_SCHEDULES",
    "make_beta_schedule",
    "rescale_zero_terminal_snr",
    "NoiseSchedule",
    "TIMESTEP_SPACINGS",
    "sampling_timesteps",
    "karras_sigma_ramp",
    "flow_shift",
    "ve_sigma_table",
    "flow_time_table",
]


# ----------------------------------------------------------------------------- beta schedules

def _linear(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    # lucidrains: the DDPM paper's 1e-4..0.02 for T=1000, rescaled so other T keep the same total noise.
    scale = 1000.0 / timesteps
    return np.linspace(scale * beta_start, scale * beta_end, timesteps, dtype=np.float64)


def _scaled_linear(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    return np.linspace(beta_start ** 0.5, beta_end ** 0.5, timesteps, dtype=np.float64) ** 2


def _sqrt_linear(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    return np.linspace(beta_start, beta_end, timesteps, dtype=np.float64)


def _sqrt(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    return np.linspace(beta_start, beta_end, timesteps, dtype=np.float64) ** 0.5


def _betas_from_alphas_cumprod(alphas_cumprod: np.ndarray, max_beta: float) -> np.ndarray:
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    betas = 1.0 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return np.clip(betas, 0.0, max_beta)


def _cosine(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    t = np.linspace(0, timesteps, timesteps + 1, dtype=np.float64) / timesteps
    alphas_cumprod = np.cos((t + s) / (1 + s) * math.pi * 0.5) ** 2
    return _betas_from_alphas_cumprod(alphas_cumprod, max_beta)


def _sigmoid(timesteps: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0,
             max_beta: float = 0.999) -> np.ndarray:
    def sig(x):
        return 1.0 / (1.0 + np.exp(-x))

    t = np.linspace(0, timesteps, timesteps + 1, dtype=np.float64) / timesteps
    v_start, v_end = sig(start / tau), sig(end / tau)
    alphas_cumprod = (-sig((t * (end - start) + start) / tau) + v_end) / (v_end - v_start)
    return _betas_from_alphas_cumprod(alphas_cumprod, max_beta)


BETA_SCHEDULES: Dict[str, Callable[..., np.ndarray]] = {
    "linear": _linear,
    "scaled_linear": _scaled_linear,
    "ldm_linear": _scaled_linear,
    "sqrt_linear": _sqrt_linear,
    "sqrt": _sqrt,
    "cosine": _cosine,
    "sigmoid": _sigmoid,
}


def make_beta_schedule(name: str, timesteps: int, **kwargs) -> np.ndarray:
    """Betas of a named schedule, shape (timesteps,), float64, each in (0, 1).

    ``kwargs`` are the schedule's own parameters (``beta_start``/``beta_end`` for the linear
    family, ``s``/``max_beta`` for cosine, ``start``/``end``/``tau`` for sigmoid).
    """
    if name not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta schedule {name!r}; choose one of {sorted(BETA_SCHEDULES)}")
    if not isinstance(timesteps, (int, np.integer)) or timesteps < 1:
        raise ValueError(f"timesteps must be a positive integer, got {timesteps!r}")
    fn = BETA_SCHEDULES[name]
    try:
        betas = fn(int(timesteps), **kwargs)
    except TypeError as err:
        import inspect
        allowed = [p for p in inspect.signature(fn).parameters if p != "timesteps"]
        raise ValueError(f"bad parameters {sorted(kwargs)} for beta schedule {name!r}; "
                         f"it takes {allowed}") from err
    if not (np.all(betas > 0) and np.all(betas < 1)):
        hint = (" (lucidrains' 'linear' scales betas by 1000/T, so it needs T > 20; use 'sqrt_linear' for "
                "unscaled betas)" if name == "linear" else "")
        raise ValueError(f"beta schedule {name!r} with T={timesteps} and {kwargs or 'default parameters'} gives "
                         f"betas in [{betas.min():.4g}, {betas.max():.4g}], outside (0, 1){hint}")
    return betas


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas so the last step has zero SNR (Lin et al. 2023, Algorithm 1).

    sqrt(alphas_cumprod) is shifted so its last value is 0 and scaled so its first is unchanged.
    Pair it with a ``pred_v`` (or ``pred_x0``) objective: at the last step x0 cannot be
    recovered from a noise prediction.
    """
    alphas_bar_sqrt = np.sqrt(np.cumprod(1.0 - np.asarray(betas, dtype=np.float64)))
    first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * first / (first - last)
    alphas_bar = alphas_bar_sqrt ** 2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


# ----------------------------------------------------------------------------- derived arrays

class NoiseSchedule:
    """Every array derived from a beta schedule (float64, shape (T,)).

    ``v_posterior`` mixes the posterior variance with beta (ldm):
    sigma_t^2 = (1 - v) * beta_t (1 - abar_{t-1}) / (1 - abar_t) + v * beta_t.
    """

    def __init__(self, betas: Sequence[float], v_posterior: float = 0.0):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if np.any(betas <= 0) or np.any(betas > 1):
            raise ValueError("betas must lie in (0, 1]")
        self.v_posterior = float(v_posterior)
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        abar = np.cumprod(alphas)
        abar_prev = np.append(1.0, abar[:-1])
        self.alphas = alphas
        self.alphas_cumprod = abar
        self.alphas_cumprod_prev = abar_prev

        with np.errstate(divide="ignore", invalid="ignore"):
            self.sqrt_alphas_cumprod = np.sqrt(abar)
            self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - abar)
            self.log_one_minus_alphas_cumprod = np.log(1.0 - abar)
            self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / abar)
            self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / abar - 1.0)

            posterior_variance = ((1.0 - self.v_posterior) * betas * (1.0 - abar_prev) / (1.0 - abar)
                                  + self.v_posterior * betas)
            self.posterior_variance = posterior_variance
            # the posterior variance is 0 at t=0: clip before the log (lucidrains, ldm)
            self.posterior_log_variance_clipped = np.log(np.maximum(posterior_variance, 1e-20))
            self.posterior_mean_coef1 = betas * np.sqrt(abar_prev) / (1.0 - abar)
            self.posterior_mean_coef2 = (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar)
            self.snr = abar / (1.0 - abar)

    # names of the per-timestep arrays, in the order they are registered as buffers
    ARRAY_NAMES: Tuple[str, ...] = (
        "betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
        "posterior_mean_coef1", "posterior_mean_coef2", "snr",
    )

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: Sequence[float], v_posterior: float = 0.0) -> "NoiseSchedule":
        """The schedule whose cumulative products are ``alphas_cumprod`` (T,), strictly decreasing in (0, 1]
        except a last 0 (zero terminal SNR): betas = 1 - abar_t / abar_{t-1}, abar_{-1} = 1."""
        abar = np.asarray(alphas_cumprod, dtype=np.float64)
        if abar.ndim != 1 or abar.size == 0 or not np.all(np.diff(abar) < 0) or abar[0] > 1 or abar[-1] < 0:
            raise ValueError("alphas_cumprod must be a non-empty, strictly decreasing 1-D array in [0, 1]")
        return cls(1.0 - abar / np.append(1.0, abar[:-1]), v_posterior=v_posterior)

    @classmethod
    def from_name(cls, name: str, timesteps: int, *, zero_terminal_snr: bool = False,
                  v_posterior: float = 0.0, **kwargs) -> "NoiseSchedule":
        betas = make_beta_schedule(name, timesteps, **kwargs)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(betas, v_posterior=v_posterior)

    def arrays(self) -> Dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in self.ARRAY_NAMES}

    @property
    def has_zero_terminal_snr(self) -> bool:
        return bool(self.alphas_cumprod[-1] == 0.0)

    # ---------------------------------------------------------------- loss weights

    def loss_weight(self, objective: str, min_snr_gamma: Optional[float] = None) -> np.ndarray:
        """Per-timestep weight of an MSE on the model output (Hang et al., min-SNR-gamma).

        With ``min_snr_gamma`` None the weights make every objective equivalent to the plain
        noise-prediction loss's weighting (1 for ``pred_noise``, SNR for ``pred_x0``,
        SNR/(SNR+1) for ``pred_v``), as lucidrains does.
        """
        snr = self.snr
        clipped = snr if min_snr_gamma is None else np.minimum(snr, float(min_snr_gamma))
        with np.errstate(divide="ignore", invalid="ignore"):
            if objective == "pred_noise":
                return clipped / snr
            if objective == "pred_x0":
                return clipped.copy()
            if objective == "pred_v":
                return clipped / (snr + 1.0)
        raise ValueError(f"unknown objective {objective!r}; choose pred_noise, pred_x0 or pred_v")

    def p2_loss_weight(self, k: float = 1.0, gamma: float = 0.0) -> np.ndarray:
        """Perception-prioritised weight (Choi et al.): (k + SNR) ** -gamma; gamma=0 gives ones."""
        return (k + self.snr) ** -gamma

    def lvlb_weights(self, objective: str) -> np.ndarray:
        """Weight turning the MSE of the model output into the per-timestep ELBO term.

        L_t = KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) = |mu~(x0) - mu~(x0_hat)|^2 / (2 sigma_t^2)
        with mu~ = coef1 * x0 + coef2 * x_t, hence:
          pred_noise: beta^2 / (2 sigma^2 alpha (1 - abar))          (ldm, identical)
          pred_x0:    coef1^2 / (2 sigma^2)
          pred_v:     coef1^2 (1 - abar) / (2 sigma^2)              (x0 error = sqrt(1-abar) v error)
        ldm writes the x0 weight as ``0.5 * sqrt(abar) / (2. * 1 - abar)``: operator precedence
        makes the denominator 2 - abar, and the intended 2 * (1 - abar) is not the ELBO weight
        either; ldm also uses ones for v. We use the exact ELBO weights above for all three.
        The t=0 weight (sigma_0 = 0 when v_posterior = 0) is set to the t=1 weight, as ldm does.
        """
        sigma2 = self.posterior_variance
        with np.errstate(divide="ignore", invalid="ignore"):
            if objective == "pred_noise":
                w = self.betas ** 2 / (2.0 * sigma2 * self.alphas * (1.0 - self.alphas_cumprod))
            elif objective == "pred_x0":
                w = self.posterior_mean_coef1 ** 2 / (2.0 * sigma2)
            elif objective == "pred_v":
                w = self.posterior_mean_coef1 ** 2 * (1.0 - self.alphas_cumprod) / (2.0 * sigma2)
            else:
                raise ValueError(f"unknown objective {objective!r}; choose pred_noise, pred_x0 or pred_v")
        w = w.copy()
        if w.shape[0] > 1:
            w[0] = w[1]
        return w


# ----------------------------------------------------------------------------- timestep spacings

def _spacing_lucidrains(T: int, S: int, offset: int) -> np.ndarray:
    # torch.linspace(-1, T-1, S+1).int(): float32 values truncated toward zero; the -1 is dropped
    times = np.linspace(-1, T - 1, S + 1, dtype=np.float64).astype(np.float32)
    return np.trunc(times).astype(np.int64)[1:][::-1] + offset


def _spacing_uniform(T: int, S: int, offset: int) -> np.ndarray:
    # ldm: every (T // S)-th step, shifted by one "to get the final alpha values right"
    c = T // S
    return np.arange(0, T, c, dtype=np.int64)[::-1] + 1 + offset


def _spacing_quad(T: int, S: int, offset: int) -> np.ndarray:
    steps = (np.linspace(0, np.sqrt(T * 0.8), S) ** 2).astype(np.int64)
    return steps[::-1] + 1 + offset


def _spacing_leading(T: int, S: int, offset: int) -> np.ndarray:
    ratio = T // S
    return (np.arange(0, S) * ratio).round().astype(np.int64)[::-1] + offset


def _spacing_trailing(T: int, S: int, offset: int) -> np.ndarray:
    return np.round(np.arange(T, 0, -T / S)).astype(np.int64) - 1 + offset


def _spacing_linspace(T: int, S: int, offset: int) -> np.ndarray:
    return np.linspace(0, T - 1, S).round().astype(np.int64)[::-1] + offset


TIMESTEP_SPACINGS: Dict[str, Callable[[int, int, int], np.ndarray]] = {
    "lucidrains": _spacing_lucidrains,
    "uniform": _spacing_uniform,      # ldm "uniform" (+1)
    "quad": _spacing_quad,            # ldm "quad" (+1)
    "leading": _spacing_leading,      # diffusers
    "trailing": _spacing_trailing,    # diffusers
    "linspace": _spacing_linspace,    # diffusers
}

# how each spacing finds the step it jumps to: the next grid entry, or t - T // S (diffusers)
_DEFAULT_PREV_RULE = {"lucidrains": "next", "uniform": "next", "quad": "next",
                      "leading": "offset", "trailing": "offset", "linspace": "offset"}


def sampling_timesteps(num_train_timesteps: int, num_steps: int, spacing: str = "lucidrains",
                       steps_offset: int = 0, prev_rule: Optional[str] = None
                       ) -> Tuple[np.ndarray, np.ndarray]:
    """The timesteps a few-step sampler visits, descending, and the step each one jumps to.

    Returns ``(timesteps, prev_timesteps)``, int64 arrays of equal length; a previous timestep
    of -1 (or below) means "the end": the sampler uses its final alpha_cumprod there (1 for
    lucidrains, ``alphas_cumprod[0]`` for ldm, ``set_alpha_to_one`` for diffusers).

    ``prev_rule`` ``"next"`` jumps to the next grid entry (lucidrains, ldm); ``"offset"`` jumps to
    ``t - T // S`` (diffusers). Defaults per spacing as the anchors do.
    """
    T, S = int(num_train_timesteps), int(num_steps)
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {sorted(TIMESTEP_SPACINGS)}")
    if not 1 <= S <= T:
        raise ValueError(f"num_steps must be between 1 and num_train_timesteps={T}, got {S}")
    timesteps = TIMESTEP_SPACINGS[spacing](T, S, int(steps_offset))
    if timesteps.max() >= T or timesteps.min() < 0:
        raise ValueError(f"spacing {spacing!r} with {S} of {T} steps (offset {steps_offset}) gives "
                         f"timesteps outside [0, {T - 1}]: use fewer steps or another spacing")
    rule = prev_rule or _DEFAULT_PREV_RULE[spacing]
    if rule == "next":
        prev = np.append(timesteps[1:], -1)
    elif rule == "offset":
        prev = timesteps - T // S
    else:
        raise ValueError(f"unknown prev_rule {rule!r}; choose 'next' or 'offset'")
    return timesteps, np.where(prev < 0, -1, prev).astype(np.int64)


# ----------------------------------------------------------------------------- continuous-time level tables
#
# EDM and flow-matching models are trained at continuous noise levels. The samplers walk a table of
# levels instead: index 0 the least noisy, T - 1 the noisiest, as a DDPM schedule's timesteps.

def karras_sigma_ramp(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) eq. 5: ``n`` sigmas from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho)."""
    if not 0.0 < sigma_min <= sigma_max or n < 1:
        raise ValueError(f"Karras sigmas need 0 < sigma_min <= sigma_max and n >= 1, got {sigma_min}, {sigma_max}, {n}")
    lo, hi = float(sigma_min) ** (1.0 / rho), float(sigma_max) ** (1.0 / rho)
    return (hi + np.linspace(0.0, 1.0, int(n), dtype=np.float64) * (lo - hi)) ** rho


def flow_shift(t, shift: float = 1.0):
    """SD3's timestep shift t -> shift t / (1 + (shift - 1) t) (numpy or float); 1 is the identity."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def ve_sigma_table(sigma_min: float, sigma_max: float, size: int = 1000, rho: float = 7.0) -> NoiseSchedule:
    """The levels x = x0 + sigma eps, sigma on the Karras ramp from sigma_min (index 0) to sigma_max (index
    size - 1), as a VP schedule (alpha_cumprod = 1 / (1 + sigma^2)); EDM's sampling table."""
    sigmas = karras_sigma_ramp(sigma_min, sigma_max, size, rho)[::-1]
    return NoiseSchedule.from_alphas_cumprod(1.0 / (1.0 + sigmas ** 2))


def flow_time_table(size: int = 1000, shift: float = 1.0) -> NoiseSchedule:
    """The levels x = (1 - t) x0 + t eps at t = flow_shift(k / size), k = 1..size (diffusers'
    ``FlowMatchEulerDiscreteScheduler`` training sigmas), as a VP schedule: alpha_cumprod =
    (1 - t)^2 / ((1 - t)^2 + t^2), zero at t = 1 (zero terminal SNR)."""
    t = flow_shift(np.arange(1, int(size) + 1, dtype=np.float64) / size, shift)
    return NoiseSchedule.from_alphas_cumprod((1.0 - t) ** 2 / ((1.0 - t) ** 2 + t ** 2))
