"""Euler, Euler ancestral and Heun against diffusers' schedulers, step by step, on the same model outputs.

As ``test_samplers``: a fixed smooth "network" written as a MindSpore Cell (run through the real compiled
``GaussianDiffusion.denoiser``) and in torch float64 (run through the diffusers scheduler); each loop
evaluates it on its own samples. Our samplers take integer timesteps, so the torch side is fed the
rounded timestep our network saw (diffusers' grid is fractional with ``linspace`` and Karras sigmas);
the conversion to x0 uses the exact sigma on both sides, which the test checks. diffusers works in
x = x_t / sqrt(abar); its samples are compared in model space, x * sqrt(abar) = x / sqrt(1 + sigma^2).
"""
from __future__ import annotations

import math

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn, ops

from ms_diffusion import GaussianDiffusion
from ms_diffusion.samplers import resolve_sampler, run_sampler, sampler_options
from ms_diffusion.samplers.euler import sigma_grid
from tests.test_samplers import torch  # noqa: F401  (the torch + diffusers fixture)

T = 50
B, C, H, W = 1, 2, 3, 3
# max |ours - diffusers| / max |diffusers| over the steps (diffusers' Euler steps run in float32); measured
# worst case over the cases: Euler 4.4e-7, Euler ancestral 1.3e-6, Heun 1.8e-6 (README's sampler table)
BOUND = {"euler": 1e-6, "euler_a": 3e-6, "heun": 4e-6}
PRED = {"epsilon": "pred_noise", "v_prediction": "pred_v"}
_P = {k: np.random.default_rng(0).uniform(lo, hi, C).reshape(1, C, 1, 1)
      for k, lo, hi in (("w1", 0.5, 1.2), ("w2", -1.0, 1.0), ("phase", 0.0, 3.0), ("a", 0.5, 0.9), ("w3", 0.1, 0.4))}


class FakeNet(nn.Cell):
    """out = a sin(w1 x + w2 sin(3 t / T + phase)) + w3 x; (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self):
        super().__init__()
        self.channels, self.out_dim, self.self_condition = C, C, False
        for k, v in _P.items():
            setattr(self, "p_" + k, Tensor(v.astype(np.float32)))

    def construct(self, x, time, x_self_cond=None, classes=None):
        tf = time.astype(ms.float32).reshape(-1, 1, 1, 1) * (3.0 / T)
        return self.p_a * ops.sin(self.p_w1 * x + self.p_w2 * ops.sin(tf + self.p_phase)) + self.p_w3 * x


def torch_net(torch, x, t: int):
    p = {k: torch.tensor(v, dtype=torch.float64) for k, v in _P.items()}
    return p["a"] * torch.sin(p["w1"] * x + p["w2"] * torch.sin(torch.tensor(t * 3.0 / T, dtype=torch.float64)
                                                                + p["phase"])) + p["w3"] * x


_DIFFUSIONS = {}


def diffusion(prediction: str) -> GaussianDiffusion:
    if prediction not in _DIFFUSIONS:
        _DIFFUSIONS[prediction] = GaussianDiffusion(FakeNet(), image_size=(H, W), timesteps=T,
                                                    objective=PRED[prediction], beta_schedule="linear",
                                                    auto_normalize=False)
    return _DIFFUSIONS[prediction]


def scheduler(name, d: GaussianDiffusion, prediction: str, **config):
    """diffusers' scheduler for ``name`` on our betas, its alphas_cumprod replaced by our float64 array."""
    import diffusers
    import torch

    cls = {"euler": diffusers.EulerDiscreteScheduler, "euler_a": diffusers.EulerAncestralDiscreteScheduler,
           "heun": diffusers.HeunDiscreteScheduler}[name]
    sched = cls(num_train_timesteps=T, trained_betas=d.schedule.betas.astype(np.float32).tolist(),
                prediction_type=prediction, **config)
    sched.alphas_cumprod = torch.tensor(d.schedule.alphas_cumprod, dtype=torch.float64)
    return sched


def recording_denoiser(d, **denoiser_options):
    """(d's denoiser for a batch of B, the list it appends (timestep, alpha_cumprod) of every call to)."""
    denoise = d.denoiser(B, **denoiser_options)
    calls = []

    def logged(x, t, sc=None, **kw):
        calls.append((t, kw.get("alpha_cumprod", float(d.schedule.alphas_cumprod[t]))))
        return denoise(x, t, sc, **kw)

    return logged, calls


CASES = [(name, prediction, karras, steps, spacing, offset)
         for name in ("euler", "euler_a", "heun")
         for prediction, karras, steps, spacing, offset in (("epsilon", False, 6, "linspace", 0),
                                                            ("v_prediction", False, 5, "leading", 1),
                                                            ("epsilon", True, 5, "linspace", 0),
                                                            ("v_prediction", True, 6, "trailing", 0))]


@pytest.mark.torch
@pytest.mark.parametrize("name,prediction,karras,steps,spacing,offset", CASES)
def test_matches_diffusers(torch, monkeypatch, name, prediction, karras, steps, spacing, offset):
    from diffusers.schedulers import scheduling_euler_ancestral_discrete

    d = diffusion(prediction)
    x = np.random.default_rng(3).standard_normal((B, C, H, W)).astype(np.float32)
    logged, calls = recording_denoiser(d, clip_denoised=False)
    ours = []

    result = run_sampler(name, logged, d.schedule, Tensor(x), np.random.default_rng(7), steps=steps, karras=karras,
                         spacing=spacing, steps_offset=offset, callback=lambda i, t, x, x0: ours.append(x.asnumpy()))
    np.testing.assert_array_equal(ours[-1], result.sample.asnumpy())

    grid = dict(timestep_spacing=spacing, steps_offset=offset)
    if name == "euler_a":   # EulerAncestralDiscreteScheduler has no Karras option: Euler's grid then
        sched = scheduler(name, d, prediction, **grid)
        sched.set_timesteps(steps)
    if name == "euler_a" and karras:
        karras_grid = scheduler("euler", d, prediction, use_karras_sigmas=True, **grid)
        karras_grid.set_timesteps(steps)
        sched.sigmas, sched.timesteps = karras_grid.sigmas, karras_grid.timesteps
    elif name != "euler_a":
        sched = scheduler(name, d, prediction, use_karras_sigmas=karras, **grid)
        sched.set_timesteps(steps)
    replay = np.random.default_rng(7)  # euler_a: ours draws one float32 normal per step
    monkeypatch.setattr(scheduling_euler_ancestral_discrete, "randn_tensor", lambda shape, **kw: torch.tensor(
        replay.standard_normal(tuple(shape)).astype(np.float32), dtype=kw.get("dtype") or torch.float64))
    sigmas = sched.sigmas.double()
    sample = torch.tensor(x, dtype=torch.float64) * math.sqrt(1.0 + float(sigmas[0]) ** 2)
    ref, ref_calls = [], []
    for t in sched.timesteps:
        t_net = int(np.rint(float(t)))
        level = 1.0 / (1.0 + float(sigmas[sched.step_index or 0]) ** 2)
        ref_calls.append((t_net, level))
        out = torch_net(torch, sched.scale_model_input(sample, t), t_net)
        sample = sched.step(out, t, sample).prev_sample
        if name != "heun" or sched.state_in_first_order or sched.step_index == len(sched.timesteps):  # step done
            ref.append((sample / math.sqrt(1.0 + float(sigmas[sched.step_index]) ** 2)).numpy())

    assert [c[0] for c in calls] == [c[0] for c in ref_calls]
    np.testing.assert_allclose([c[1] for c in calls], [c[1] for c in ref_calls], rtol=1e-6)
    assert len(calls) == (2 * steps - 1 if name == "heun" else steps)
    assert len(ours) == len(ref) == steps
    errs = [float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-3)) for a, b in zip(ours, ref)]
    err = max(errs)
    print(f"\n{name} {prediction} karras={karras} S={steps} {spacing}+{offset}: {err:.2e}")
    assert err < BOUND[name], errs


def test_grid_and_registry():
    d = diffusion("epsilon")
    ts, levels = sigma_grid(d.schedule, 5, "linspace")
    assert ts.tolist() == [49, 37, 24, 12, 0] and levels[-1].is_clean and len(levels) == 6
    ts, levels = sigma_grid(d.schedule, 5, karras=True)
    sig = [lv.ve_sigma for lv in levels[:-1]]
    assert np.all(np.diff(sig) < 0) and ts[0] == T - 1 and ts[-1] == 0
    assert resolve_sampler("Euler_Ancestral") == "euler_a" and "karras" in sampler_options("heun")
    with pytest.raises(ValueError, match="karras"):
        sigma_grid(d.schedule, 5, karras=True, timesteps=[40, 20])


def test_gaussian_diffusion_sample_heun():
    d = diffusion("v_prediction")
    out = d.sample(2, sampler="heun", steps=4, seed=0)
    assert tuple(out.shape) == (2, C, H, W) and np.all(np.isfinite(out.asnumpy()))
