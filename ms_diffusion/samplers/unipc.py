"""UniPC (Zhao et al. 2023): a multistep predictor (UniP) and corrector (UniC), data-prediction form.

Matches diffusers' ``UniPCMultistepScheduler(predict_x0=True, solver_type="bh1" | "bh2",
final_sigmas_type="zero")`` step by step on the same grid as DPM-Solver++ (``dpmpp_grid``: diffusers'
linspace / leading / trailing spacings, or Karras sigmas). Every step evaluates the network once at
the predicted sample x_i; unless disabled, UniC first corrects x_i with that evaluation (the corrector
reuses it, so it costs nothing extra), then UniP of order p predicts x_{i+1}. The corrector of step i
has the order of the predictor that produced x_i; the last step (to clean data) is never corrected.

Coefficients are float64 host scalars; in lambda = log(alpha / sigma), with h = lambda_t - lambda_s0,
hh = -h, B(h) = hh (bh1) or e^hh - 1 (bh2) and r_k = (lambda_{s_k} - lambda_s0) / h:

  x_t = (sigma_t / sigma_s0) x - alpha_t (e^hh - 1) m0 - alpha_t B(h) sum_k rho_k D_k,  D_k = (m_k - m0) / r_k

with rho from the linear system R rho = b of the paper (diffusers' simplifications: rho = 1/2 for a
second-order predictor and for a first-order corrector). Into clean data h = inf; diffusers' bh1 then
computes -inf * 0 = NaN, here the limit (x_t = m0 for the first-order final step) is used instead.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import mindspore as ms
import numpy as np

from ms_diffusion.samplers.base import Denoise, SampleResult
from ms_diffusion.samplers.dpm_solver import dpmpp_grid
from ms_diffusion.samplers.levels import NoiseLevel
from ms_diffusion.samplers.loop import SamplingLoop
from ms_diffusion.schedules import NoiseSchedule

__all__ = ["unipc_sample", "unipc_predict", "unipc_correct", "UNIPC_ORDERS", "UNIPC_SOLVER_TYPES"]

UNIPC_ORDERS = (1, 2, 3)
UNIPC_SOLVER_TYPES = ("bh1", "bh2")


def _coefficients(s0: NoiseLevel, t: NoiseLevel, history: Sequence[NoiseLevel], order: int, solver_type: str):
    """(h_phi_1, B_h, rks (order - 1,), R (order, order), b (order,)) of one UniP / UniC update from s0 to t;
    ``history``: the levels of the older data predictions, newest first."""
    h = t.log_snr - s0.log_snr
    hh = -h
    if math.isinf(hh):  # into clean data: e^hh - 1 = -1, B(h) only multiplies terms that vanish (order 1)
        if order > 1:
            raise ValueError("unipc: a step into clean data must be first order")
        return -1.0, (hh if solver_type == "bh1" else -1.0), np.zeros(0), None, None
    h_phi_1 = math.expm1(hh)
    b_h = hh if solver_type == "bh1" else h_phi_1
    rks = np.array([(lv.log_snr - s0.log_snr) / h for lv in history[:order - 1]] + [1.0], dtype=np.float64)
    h_phi_k = h_phi_1 / hh - 1.0
    factorial = 1.0
    R, b = [], []
    for i in range(1, order + 1):
        R.append(rks ** (i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return h_phi_1, b_h, rks[:-1], np.stack(R), np.array(b)


def _step_coefficients(what: str, x0s: Sequence[ms.Tensor], levels: Sequence[NoiseLevel], solver_type: str):
    """(order p, level from, level to, ``_coefficients``) of a UniP / UniC step over ``levels``; checks p."""
    p = len(x0s)
    if p not in UNIPC_ORDERS or len(levels) != p + 1:
        raise ValueError(f"{what} of order {p} (1-3) needs {p + 1} levels, got {len(levels)}")
    s0, t = levels[-2], levels[-1]
    return p, s0, t, _coefficients(s0, t, list(levels[:-2])[::-1], p, solver_type)


def unipc_predict(x: ms.Tensor, x0s: Sequence[ms.Tensor], levels: Sequence[NoiseLevel],
                  solver_type: str = "bh2") -> ms.Tensor:
    """UniP of order p = len(x0s) (1-3) from ``levels[-2]`` to ``levels[-1]``.

    x: (B, C, H, W) at levels[-2]; x0s: the data predictions at levels[-p-1:-1], oldest first.
    """
    p, s0, t, (h_phi_1, b_h, rks, R, b) = _step_coefficients("unipc_predict", x0s, levels, solver_type)
    m0 = x0s[-1]
    out = (t.sigma / s0.sigma) * x + (-t.alpha * h_phi_1) * m0
    if p == 1:
        return out
    rhos = np.array([0.5]) if p == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
    res = None
    for k in range(p - 1):
        term = (float(rhos[k]) / float(rks[k])) * (x0s[-2 - k] - m0)
        res = term if res is None else res + term
    return out - (t.alpha * b_h) * res


def unipc_correct(x_prev: ms.Tensor, x0s: Sequence[ms.Tensor], x0_t: ms.Tensor, levels: Sequence[NoiseLevel],
                  solver_type: str = "bh2") -> ms.Tensor:
    """UniC of order p = len(x0s) (1-3): the sample at ``levels[-1]`` recomputed from x_prev (B, C, H, W) at
    ``levels[-2]``, the data predictions x0s at levels[-p-1:-1] (oldest first) and x0_t, the data
    prediction at levels[-1] (made from the uncorrected sample)."""
    p, s0, t, (h_phi_1, b_h, rks, R, b) = _step_coefficients("unipc_correct", x0s, levels, solver_type)
    m0 = x0s[-1]
    rhos = np.array([0.5]) if p == 1 else np.linalg.solve(R, b)
    res = float(rhos[-1]) * (x0_t - m0)
    for k in range(p - 1):
        res = res + (float(rhos[k]) / float(rks[k])) * (x0s[-2 - k] - m0)
    return (t.sigma / s0.sigma) * x_prev + (-t.alpha * h_phi_1) * m0 - (t.alpha * b_h) * res


def unipc_sample(denoise: Denoise, schedule: NoiseSchedule, x: ms.Tensor, rng: np.random.Generator, *,
                 steps: Optional[int] = None, timesteps: Optional[Sequence[int]] = None, spacing: str = "linspace",
                 steps_offset: int = 0, order: int = 2, solver_type: str = "bh2", lower_order_final: bool = True,
                 disable_corrector: Sequence[int] = (), karras: bool = False, **loop_options) -> SampleResult:
    """UniPC from x (B, C, H, W) in ``steps`` network evaluations on ``dpmpp_grid``.

    ``order`` 1-3 of the predictor (UniPC-p; the corrected update has order p + 1), the first steps
    use lower orders until enough history exists; ``lower_order_final`` caps the order of step i at
    the number of steps left (diffusers), whatever the step count; the last step is always first
    order. ``solver_type``: ``bh2`` (diffusers' default, better with guidance) or ``bh1`` (the
    paper's choice for unconditional sampling at few steps). ``disable_corrector``: step indices whose
    predicted sample is not corrected (diffusers' semantics). Deterministic: ``rng`` is only used for
    inpainting, where the corrected sample keeps the known region the network saw. Loop options:
    see ``samplers.loop``.
    """
    if order not in UNIPC_ORDERS:
        raise ValueError(f"unipc: order must be one of {UNIPC_ORDERS}, got {order!r}")
    if solver_type not in UNIPC_SOLVER_TYPES:
        raise ValueError(f"unipc: solver_type must be one of {UNIPC_SOLVER_TYPES}, got {solver_type!r}")
    skip = {int(j) for j in disable_corrector}
    ts, levels = dpmpp_grid(schedule, steps, spacing, steps_offset, karras, timesteps)
    n = len(ts)
    loop = SamplingLoop(denoise, schedule, rng, name="UniPC", num_steps=n, **loop_options)
    loop.start(x, int(ts[0]))
    x0s: List[ms.Tensor] = []
    x_last: Optional[ms.Tensor] = None
    k_last = 0
    for i, t in enumerate(loop.steps(ts.tolist())):
        x = loop.inpaint(x, levels[i])
        x0 = loop.predict(x, t, levels[i])[1]
        if i > 0 and (i - 1) not in skip:
            corrected = unipc_correct(x_last, x0s[-k_last:], x0, levels[i - k_last:i + 1], solver_type)
            x = corrected if loop.mask is None else loop.mask * x + (1.0 - loop.mask) * corrected
        x0s = (x0s + [x0])[-order:]
        k = min(order, n - i) if lower_order_final else order
        k = min(k, len(x0s))
        if i == n - 1:
            k = 1
        x_last, k_last = x, k
        x = unipc_predict(x, x0s[-k:], levels[i + 1 - k:i + 2], solver_type)
        loop.end_step(i, t, -1 if i == n - 1 else int(ts[i + 1]), x, x0)
    return loop.result(x)
