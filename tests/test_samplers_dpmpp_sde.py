"""SDE-DPM-Solver++ (sampler ``dpmpp_sde``) against diffusers, step by step, on the same model outputs and noise.

As ``test_samplers_sigma`` (whose network this reuses): a fixed smooth "network" written as a MindSpore Cell (run
through the real compiled ``GaussianDiffusion.denoiser``) and in torch float64 (run through diffusers'
``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")``, its alphas_cumprod replaced by our float64
array); each loop evaluates it on its own samples. diffusers' ``randn_tensor`` is replaced by a replay of our rng:
ours draws one float32 standard normal of x's shape per step but the last, diffusers one every step (its last is
multiplied by sigma = 0).
"""
from __future__ import annotations

import numpy as np
import pytest
from mindspore import Tensor

from ms_diffusion.samplers import resolve_sampler, run_sampler, sampler_options
from tests.test_samplers import torch  # noqa: F401  (the torch + diffusers fixture)
from tests.test_samplers_sigma import B, C, H, T, W, diffusion, recording_denoiser, torch_net

# max |ours - diffusers| / max |diffusers| over the steps; measured worst case over the cases 4.1e-6 (README's
# sampler table; epsilon, order 2, Karras: the SDE step amplifies float32 x0 errors several times more than
# the ODE step does, the other cases stay below 4.1e-7)
BOUND = 1e-5


CASES = [(prediction, order, karras, steps, spacing, lower_order_final)
         for order in (1, 2) for prediction, karras, steps, spacing, lower_order_final in (
             ("epsilon", False, 8, "linspace", True),
             ("v_prediction", False, 6, "trailing", True),
             ("epsilon", True, 7, "linspace", True),
             ("v_prediction", True, 6, "linspace", False))]


@pytest.mark.torch
@pytest.mark.parametrize("prediction,order,karras,steps,spacing,lower_order_final", CASES)
def test_dpmpp_sde_matches_diffusers(torch, monkeypatch, prediction, order, karras, steps, spacing,
                                     lower_order_final):
    from diffusers import DPMSolverMultistepScheduler
    from diffusers.schedulers import scheduling_dpmsolver_multistep

    d = diffusion(prediction)
    x = np.random.default_rng(3).standard_normal((B, C, H, W)).astype(np.float32)
    logged, calls = recording_denoiser(d, clip_denoised=False)
    ours = []

    result = run_sampler("dpmpp_2m_sde", logged, d.schedule, Tensor(x), np.random.default_rng(7), steps=steps,
                         order=order, karras=karras, spacing=spacing, lower_order_final=lower_order_final,
                         callback=lambda i, t, x, x0: ours.append(x.asnumpy()))
    np.testing.assert_array_equal(ours[-1], result.sample.asnumpy())

    betas = d.schedule.betas.astype(np.float32).tolist()
    sched = DPMSolverMultistepScheduler(num_train_timesteps=T, trained_betas=betas, prediction_type=prediction, algorithm_type="sde-dpmsolver++",
                                        solver_order=order, solver_type="midpoint", use_karras_sigmas=karras,
                                        timestep_spacing=spacing, lower_order_final=lower_order_final)
    sched.alphas_cumprod = torch.tensor(d.schedule.alphas_cumprod, dtype=torch.float64)
    sched.set_timesteps(steps)
    replay = np.random.default_rng(7)
    monkeypatch.setattr(scheduling_dpmsolver_multistep, "randn_tensor", lambda shape, **kw: torch.tensor(
        replay.standard_normal(tuple(shape)).astype(np.float32), dtype=kw.get("dtype") or torch.float64))
    sample, ref = torch.tensor(x, dtype=torch.float64), []
    for t in sched.timesteps:
        sample = sched.step(torch_net(torch, sample, int(t)), t, sample).prev_sample
        ref.append(sample.numpy())

    assert [c[0] for c in calls] == sched.timesteps.tolist()
    if karras:  # the network sees rounded timesteps, the conversion uses the exact Karras level
        np.testing.assert_allclose([c[1] for c in calls], [1 / (1 + float(s) ** 2) for s in sched.sigmas[:-1]],
                                   rtol=1e-6)
    assert len(ours) == len(ref) == steps
    errs = [float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-3)) for a, b in zip(ours, ref)]
    err = max(errs)
    print(f"\ndpmpp_sde {prediction} order={order} karras={karras} S={steps} {spacing} "
          f"lower_order_final={lower_order_final}: {err:.2e}")
    assert err < BOUND, errs


def test_noise_is_drawn_from_the_rng():
    d = diffusion("epsilon")
    denoise = d.denoiser(B, clip_denoised=False)
    x = Tensor(np.random.default_rng(3).standard_normal((B, C, H, W)).astype(np.float32))
    runs = [run_sampler("dpmpp_sde", denoise, d.schedule, x, np.random.default_rng(s), steps=5).sample.asnumpy()
            for s in (1, 1, 2)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert np.abs(runs[0] - runs[2]).max() > 1e-3
    ode = run_sampler("dpmpp", denoise, d.schedule, x, np.random.default_rng(1), steps=5,
                      algorithm="dpmsolver++").sample.asnumpy()
    assert np.abs(runs[0] - ode).max() > 1e-3


def test_registry_and_errors():
    assert resolve_sampler("DPMPP_2M_SDE") == "dpmpp_sde" == resolve_sampler("sde-dpmsolver++")
    assert {"order", "karras", "lower_order_final"} <= set(sampler_options("dpmpp_sde"))
    assert "algorithm" in sampler_options("dpmpp") and "algorithm" not in sampler_options("dpmpp_sde")
    d = diffusion("epsilon")
    x = Tensor(np.zeros((B, C, H, W), np.float32))
    with pytest.raises(ValueError, match=r"order must be one of \(1, 2\)"):
        run_sampler("dpmpp_sde", d.denoiser(B), d.schedule, x, np.random.default_rng(0), steps=5, order=3)
    with pytest.raises(ValueError, match="algorithm must be one of"):
        run_sampler("dpmpp", d.denoiser(B), d.schedule, x, np.random.default_rng(0), steps=5, algorithm="sde")


def test_gaussian_diffusion_sample_dpmpp_sde():
    d = diffusion("v_prediction")
    out = d.sample(2, sampler="dpmpp_sde", steps=4, seed=0)
    assert tuple(out.shape) == (2, C, H, W) and np.all(np.isfinite(out.asnumpy()))
