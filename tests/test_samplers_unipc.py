"""UniPC against diffusers' UniPCMultistepScheduler, step by step, on the same model outputs.

As ``test_samplers_sigma``: a fixed smooth "network" written as a MindSpore Cell (run through the real
compiled ``GaussianDiffusion.denoiser``) and in torch float64 (run through the diffusers scheduler); each
loop evaluates it on its own samples. With Karras sigmas the network sees the rounded timestep on both
sides and the conversion to x0 uses the exact sigma, which the test checks. diffusers' bh1 computes
-inf * 0 = NaN on the final step into clean data; its reference there is the limit, the last x0
prediction (``sched.model_outputs[-1]``), which is what a first-order step to sigma = 0 returns.
"""
from __future__ import annotations

import numpy as np
import pytest
from mindspore import Tensor

from ms_diffusion.samplers import resolve_sampler, run_sampler, sampler_options
from tests.test_samplers import torch  # noqa: F401  (the torch + diffusers fixture)
from tests.test_samplers_sigma import B, C, H, W, diffusion, recording_denoiser, torch_net

# max |ours - diffusers| / max |diffusers| over the steps (diffusers' sigmas are float32); measured
# worst case over the cases 4.5e-7 (README's sampler table)
BOUND = 2e-6

CASES = [(solver, order, karras, prediction, steps, spacing, offset)
         for solver in ("bh1", "bh2")
         for order, karras, prediction, steps, spacing, offset in (
             (1, False, "epsilon", 6, "linspace", 0),
             (2, False, "v_prediction", 7, "leading", 1),
             (3, False, "epsilon", 8, "trailing", 0),
             (1, True, "v_prediction", 5, "linspace", 0),
             (2, True, "epsilon", 6, "linspace", 0),
             (3, True, "v_prediction", 8, "linspace", 0))]


def reference(torch, d, prediction, x, steps, stop=None, **config):
    """(network calls [(t, alpha_cumprod)], sample after each step) of diffusers' UniPC in float64."""
    from diffusers import UniPCMultistepScheduler

    sched = UniPCMultistepScheduler(num_train_timesteps=d.schedule.num_timesteps,
                                    trained_betas=d.schedule.betas.astype(np.float32).tolist(),
                                    prediction_type=prediction, predict_x0=True, **config)
    sched.alphas_cumprod = torch.tensor(d.schedule.alphas_cumprod, dtype=torch.float64)
    sched.set_timesteps(steps)
    sample, ref, calls = torch.tensor(x, dtype=torch.float64), [], []
    for i, t in enumerate(sched.timesteps[:stop]):
        calls.append((int(t), 1.0 / (1.0 + float(sched.sigmas[i]) ** 2)))
        sample = sched.step(torch_net(torch, sample, int(t)), t, sample).prev_sample
        ref.append(sample.numpy().copy())
    if stop is None and not np.all(np.isfinite(ref[-1])):  # bh1 into clean data (see the module docstring)
        assert config.get("solver_type") == "bh1" and sched.this_order == 1
        ref[-1] = sched.model_outputs[-1].numpy()
    return calls, ref


def ours(d, x, **options):
    logged, calls = recording_denoiser(d, clip_denoised=False)
    xs = []

    result = run_sampler("unipc", logged, d.schedule, Tensor(x), np.random.default_rng(7),
                         callback=lambda i, t, x, x0: xs.append(x.asnumpy()), **options)
    np.testing.assert_array_equal(xs[-1], result.sample.asnumpy())
    return calls, xs


def compare(calls, xs, ref_calls, ref, label):
    assert [c[0] for c in calls] == [c[0] for c in ref_calls]
    np.testing.assert_allclose([c[1] for c in calls], [c[1] for c in ref_calls], rtol=1e-6)
    assert len(xs) == len(ref)
    errs = [float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-3)) for a, b in zip(xs, ref)]
    print(f"\nunipc {label}: {max(errs):.2e}", ["%.1e" % e for e in errs])
    assert max(errs) < BOUND, errs


@pytest.mark.torch
@pytest.mark.parametrize("solver,order,karras,prediction,steps,spacing,offset", CASES)
def test_matches_diffusers(torch, solver, order, karras, prediction, steps, spacing, offset):
    d = diffusion(prediction)
    x = np.random.default_rng(3).standard_normal((B, C, H, W)).astype(np.float32)
    calls, xs = ours(d, x, steps=steps, order=order, solver_type=solver, karras=karras, spacing=spacing,
                     steps_offset=offset)
    ref_calls, ref = reference(torch, d, prediction, x, steps, solver_order=order, solver_type=solver,
                               use_karras_sigmas=karras, timestep_spacing=spacing, steps_offset=offset,
                               lower_order_final=True)
    compare(calls, xs, ref_calls, ref, f"{solver} order={order} karras={karras} {prediction} S={steps} "
                                       f"{spacing}+{offset}")


@pytest.mark.torch
@pytest.mark.parametrize("solver", ["bh1", "bh2"])
def test_disable_corrector_and_no_lower_order_final(torch, solver):
    """disable_corrector skips the correction of the listed steps' predictions; without lower_order_final
    diffusers keeps order 3 into clean data (r = 0: a singular solve), ours drops to first order on the last step only,
    so every step but the last is compared."""
    d = diffusion("epsilon")
    x = np.random.default_rng(4).standard_normal((B, C, H, W)).astype(np.float32)
    calls, xs = ours(d, x, steps=7, order=3, solver_type=solver, lower_order_final=False, disable_corrector=[1, 4])
    ref_calls, ref = reference(torch, d, "epsilon", x, 7, stop=6, solver_order=3, solver_type=solver,
                               lower_order_final=False, disable_corrector=[1, 4])
    assert np.all(np.isfinite(xs[-1]))
    compare(calls[:-1], xs[:-1], ref_calls, ref, f"{solver} order=3 lower_order_final=False disable_corrector=[1, 4]")


def test_registry_and_errors():
    d = diffusion("epsilon")
    assert resolve_sampler("UniPC") == "unipc" and resolve_sampler("uni_pc") == "unipc"
    assert {"solver_type", "order", "karras", "disable_corrector"} <= set(sampler_options("unipc"))
    denoise = d.denoiser(B, clip_denoised=False)
    x = Tensor(np.zeros((B, C, H, W), np.float32))
    with pytest.raises(ValueError, match="order"):
        run_sampler("unipc", denoise, d.schedule, x, np.random.default_rng(0), steps=5, order=4)
    with pytest.raises(ValueError, match="solver_type"):
        run_sampler("unipc", denoise, d.schedule, x, np.random.default_rng(0), steps=5, solver_type="bh3")


def test_gaussian_diffusion_sample_unipc():
    d = diffusion("v_prediction")
    out = d.sample(2, sampler="unipc", steps=4, seed=0)
    assert tuple(out.shape) == (2, C, H, W) and np.all(np.isfinite(out.asnumpy()))
