"""Samplers against diffusers' schedulers (and lucidrains) fed the same model, noise and starting point.

The "model" is a fixed smooth function of (x, t) written twice, as a MindSpore Cell (run through the
real ``GaussianDiffusion.denoiser``, jit-compiled) and in torch float64 (run through the diffusers
scheduler). Each loop evaluates the model on its own samples, so the comparison covers the whole
chain: timesteps (exactly), parameter conversion, clipping, solver arithmetic and injected noise.
The torch side runs in float64 with the schedule's float64 alphas_cumprod, so the error measured is
our float32 pipeline's.
"""
from __future__ import annotations

import math
import warnings

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn, ops

from ms_diffusion import GaussianDiffusion
from ms_diffusion.samplers import (SAMPLER_NAMES, NoiseLevel, ddim_invert, resolve_sampler, run_sampler,
                                   sampler_options)
from ms_diffusion.samplers.dpm_solver import dpmpp_grid
from ms_diffusion.samplers.levels import karras_sigmas, sigma_to_timestep
from ms_diffusion.samplers.thresholding import clip_x0, dynamic_threshold, resolve_clip
from ms_diffusion.schedules import NoiseSchedule, sampling_timesteps

T = 50                       # training timesteps of the test schedule (lucidrains "linear")
B, C, H, W = 2, 2, 4, 4
# max |ours - reference| / max |reference| over the steps, asserted per sampler; README's sampler table quotes the
# measured worst case over each test's cases (DDPM 3.9e-6, DDIM 4.9e-7, PLMS 1.04e-5, DPM-Solver++ 6.2e-7,
# inversion 3.0e-7) beside these bounds. PLMS is the loosest: its eps -> x0 step divides by sqrt(alpha_cumprod).
BOUND = {"ddpm": 5e-6, "ddim": 1e-6, "plms": 2e-5, "dpmpp": 1e-6, "inversion": 5e-7}
PRED = {"epsilon": "pred_noise", "v_prediction": "pred_v", "sample": "pred_x0"}


def _net_params(out_dim: int, seed: int = 0):
    r = np.random.default_rng(seed)
    p = {"w1": r.uniform(0.5, 1.2, out_dim), "w2": r.uniform(-1.0, 1.0, out_dim),
         "phase": r.uniform(0, 3, out_dim), "a": r.uniform(0.5, 0.9, out_dim), "w3": r.uniform(0.1, 0.4, out_dim)}
    p["w3"][C:] = 0.0  # learned-variance channels stay in (-1, 1)
    return {k: v.reshape(1, out_dim, 1, 1) for k, v in p.items()}


class FakeNet(nn.Cell):
    """out = a sin(w1 x + w2 sin(3 t / T + phase)) + w3 x (+ 0.2 x_self_cond); (B, C, H, W) -> (B, out_dim, H, W).

    Built from sin, which MindSpore's CPU kernel computes to float32 precision (its tanh is only
    accurate to ~1e-4 and would dominate the comparison).
    """

    def __init__(self, out_dim: int = C, self_condition: bool = False):
        super().__init__()
        self.channels, self.out_dim, self.self_condition = C, out_dim, self_condition
        self.params = _net_params(out_dim)
        for k, v in self.params.items():
            setattr(self, "p_" + k, Tensor(v.astype(np.float32)))

    def construct(self, x, time, x_self_cond=None, classes=None):
        if self.out_dim != self.channels:
            x = ops.cat((x, x), axis=1)
        tf = time.astype(ms.float32).reshape(-1, 1, 1, 1) * (3.0 / T)
        out = self.p_a * ops.sin(self.p_w1 * x + self.p_w2 * ops.sin(tf + self.p_phase)) + self.p_w3 * x
        if self.self_condition and x_self_cond is not None:
            out = out + 0.2 * x_self_cond
        return out


def torch_net(params, x, t: int, x_self_cond=None):
    """FakeNet in torch (any dtype of x)."""
    import torch

    p = {k: torch.tensor(v, dtype=x.dtype) for k, v in params.items()}
    if p["a"].shape[1] != x.shape[1]:
        x = torch.cat((x, x), dim=1)
    out = p["a"] * torch.sin(p["w1"] * x + p["w2"] * torch.sin(torch.tensor(t * 3.0 / T, dtype=x.dtype)
                                                               + p["phase"])) + p["w3"] * x
    if x_self_cond is not None:
        out = out + 0.2 * x_self_cond
    return out


_DIFFUSIONS = {}


def diffusion(prediction: str = "epsilon", learned_variance: bool = False, self_condition: bool = False,
              **kwargs) -> GaussianDiffusion:
    """One GaussianDiffusion (and its compiled denoiser) per configuration, shared by the tests."""
    key = (prediction, learned_variance, self_condition, tuple(sorted(kwargs.items())))
    if key not in _DIFFUSIONS:
        net = FakeNet(2 * C if learned_variance else C, self_condition)
        _DIFFUSIONS[key] = GaussianDiffusion(net, image_size=(H, W), timesteps=T, objective=PRED[prediction],
                                             beta_schedule="linear", auto_normalize=False, **kwargs)
    return _DIFFUSIONS[key]


def x_T(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((B, C, H, W)).astype(np.float32)


def run_ours(d: GaussianDiffusion, name: str, x, seed: int = 1, clip=False, **options):
    """(denoiser calls [(t, alpha_cumprod)], samples after each step) of our sampler."""
    denoise = d.denoiser(B, clip_denoised=clip, **({} if clip != "dynamic" else
                                                    dict(threshold_ratio=0.9, sample_max_value=1.5)))
    calls, xs = [], []

    def logged(x, t, sc=None, **kw):
        calls.append((t, kw.get("alpha_cumprod", float(d.schedule.alphas_cumprod[t]))))
        return denoise(x, t, sc, **kw)

    result = run_sampler(name, logged, d.schedule, Tensor(x), np.random.default_rng(seed),
                         callback=lambda i, t, x, x0: xs.append(x.asnumpy()), **options)
    np.testing.assert_array_equal(xs[-1], result.sample.asnumpy())
    return calls, xs


def float64_scheduler(cls, schedule: NoiseSchedule, prediction: str, **config):
    """A diffusers scheduler on our betas, its alphas_cumprod replaced by our float64 array."""
    import torch

    sched = cls(num_train_timesteps=T, trained_betas=schedule.betas.astype(np.float32).tolist(),
                prediction_type=prediction, **config)
    abar = torch.tensor(schedule.alphas_cumprod, dtype=torch.float64)
    sched.alphas_cumprod = abar
    for name in ("final_alpha_cumprod", "initial_alpha_cumprod"):
        if hasattr(sched, name):
            setattr(sched, name, torch.tensor(1.0, dtype=torch.float64)
                    if float(getattr(sched, name)) == 1.0 else abar[0])
    return sched


def max_rel_err(ours, ref) -> float:
    assert len(ours) == len(ref), (len(ours), len(ref))
    errs = [float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-3)) for a, b in zip(ours, ref)]
    print("\nper-step", ["%.1e" % e for e in errs])
    return max(errs)


@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    torch.set_num_threads(2)
    return torch


def as64(torch, a):
    return torch.tensor(np.asarray(a), dtype=torch.float64)


# ----------------------------------------------------------------------------- DDPM


@pytest.mark.torch
@pytest.mark.parametrize("prediction,steps,spacing,offset,clip,variance", [
    ("epsilon", None, "leading", 0, True, False),        # all 50 steps, static clipping
    ("v_prediction", 10, "leading", 1, False, False),
    ("epsilon", 7, "trailing", 0, False, False),
    ("v_prediction", 12, "linspace", 0, True, False),
    ("epsilon", 10, "leading", 0, "dynamic", False),     # Imagen thresholding, ratio 0.9, max 1.5
    ("epsilon", None, "leading", 0, True, True),         # learned_range variance, all steps
    ("epsilon", 9, "leading", 0, True, True),            # learned_range variance on a subset
])
def test_ddpm_matches_diffusers(torch, monkeypatch, prediction, steps, spacing, offset, clip, variance):
    from diffusers import DDPMScheduler
    from diffusers.schedulers import scheduling_ddpm

    d = diffusion(prediction, learned_variance=variance)
    x = x_T()
    calls, ours = run_ours(d, "ddpm", x, seed=5, clip=clip, steps=steps, spacing=spacing, steps_offset=offset)

    sched = float64_scheduler(DDPMScheduler, d.schedule, prediction, timestep_spacing=spacing, steps_offset=offset,
                              clip_sample=clip is True, thresholding=clip == "dynamic",
                              dynamic_thresholding_ratio=0.9, sample_max_value=1.5,
                              variance_type="learned_range" if variance else "fixed_small")
    sched.set_timesteps(steps or T)
    replay = np.random.default_rng(5)  # ours draws one float32 normal per step that adds noise
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda shape, **kw: torch.tensor(
        replay.standard_normal(tuple(shape)).astype(np.float32), dtype=kw.get("dtype") or torch.float64))
    sample, ref = as64(torch, x), []
    for t in sched.timesteps:
        sample = sched.step(torch_net(d.model.params, sample, int(t)), t, sample).prev_sample
        ref.append(sample.numpy())
    assert [c[0] for c in calls] == sched.timesteps.tolist()
    err = max_rel_err(ours, ref)
    print(f"ddpm {prediction} steps={steps} {spacing}+{offset} clip={clip} learned_var={variance}: {err:.2e}")
    assert err < BOUND["ddpm"], err


# ----------------------------------------------------------------------------- DDIM


@pytest.mark.torch
@pytest.mark.parametrize("prediction,steps,spacing,offset,eta,clip,final_one,noise_opts,inpaint", [
    ("epsilon", 10, "leading", 1, 0.0, False, True, {}, False),
    ("v_prediction", 8, "trailing", 0, 1.0, False, True, {}, False),
    ("epsilon", 12, "linspace", 0, 1.0, True, False, {}, False),          # clipped, set_alpha_to_one=False
    ("v_prediction", 5, "leading", 0, 0.5, False, True, dict(temperature=0.7, noise_dropout=0.3), False),
    ("epsilon", 10, "leading", 0, 1.0, False, True, {}, True),            # ldm mask + x0 inpainting
])
def test_ddim_matches_diffusers(torch, prediction, steps, spacing, offset, eta, clip, final_one, noise_opts,
                                inpaint):
    from diffusers import DDIMScheduler

    d = diffusion(prediction)
    x = x_T()
    abar0 = float(d.schedule.alphas_cumprod[0])
    known = np.random.default_rng(9).uniform(-1, 1, x.shape).astype(np.float32)
    mask = np.zeros((1, 1, H, W), np.float32)
    mask[..., :, : W // 2] = 1.0
    options = dict(steps=steps, spacing=spacing, steps_offset=offset, eta=eta,
                   final_alpha_cumprod=1.0 if final_one else abar0, **noise_opts)
    if inpaint:
        options.update(mask=mask, x0=known)
    calls, ours = run_ours(d, "ddim", x, seed=3, clip=clip, **options)

    sched = float64_scheduler(DDIMScheduler, d.schedule, prediction, timestep_spacing=spacing, steps_offset=offset,
                              clip_sample=clip, set_alpha_to_one=final_one)
    sched.set_timesteps(steps)
    replay = np.random.default_rng(3)
    temperature, dropout = noise_opts.get("temperature", 1.0), noise_opts.get("noise_dropout", 0.0)
    sample, ref = as64(torch, x), []
    for i, t in enumerate(sched.timesteps):
        if inpaint:  # ldm: the known region re-noised to the current step with fresh noise
            noise = replay.standard_normal(x.shape).astype(np.float32)
            orig = sched.add_noise(as64(torch, known), as64(torch, noise), t.reshape(1))
            sample = orig * as64(torch, mask) + (1 - as64(torch, mask)) * sample
        noise = None
        if eta > 0 and (i < steps - 1 or not final_one):  # a last step to alpha 1 has sigma 0: no draw
            z = replay.standard_normal(x.shape) * temperature
            if dropout:
                z = np.where(replay.random(x.shape) >= dropout, z / (1 - dropout), 0.0)
            noise = as64(torch, z.astype(np.float32))
        out = torch_net(d.model.params, sample, int(t))
        sample = sched.step(out, t, sample, eta=eta, use_clipped_model_output=True,
                            variance_noise=noise if noise is not None else torch.zeros_like(sample)).prev_sample
        ref.append(sample.numpy())
    assert [c[0] for c in calls] == sched.timesteps.tolist()
    err = max_rel_err(ours, ref)
    print(f"ddim {prediction} S={steps} {spacing}+{offset} eta={eta} clip={clip} {noise_opts} inpaint={inpaint}: "
          f"{err:.2e}")
    assert err < BOUND["ddim"], err


# ----------------------------------------------------------------------------- PLMS


@pytest.mark.torch
@pytest.mark.parametrize("prediction,steps,spacing,offset", [
    ("epsilon", 10, "leading", 1),
    ("v_prediction", 6, "leading", 0),
    ("epsilon", 5, "trailing", 0),
    ("v_prediction", 10, "linspace", 0),
])
def test_plms_matches_diffusers_pndm(torch, prediction, steps, spacing, offset):
    """PLMS extrapolates eps (PNDM paper, ldm). For a v-model diffusers' PNDM extrapolates the raw v
    outputs instead, a different method; the reference is then PNDM fed the model's eps,
    eps = sqrt(abar_t) v + sqrt(1 - abar_t) x at each evaluation."""
    from diffusers import PNDMScheduler

    d = diffusion(prediction)
    x = x_T()
    abar = d.schedule.alphas_cumprod
    calls, ours = run_ours(d, "plms", x, steps=steps, spacing=spacing, steps_offset=offset,
                           final_alpha_cumprod=float(abar[0]))
    sched = float64_scheduler(PNDMScheduler, d.schedule, "epsilon", timestep_spacing=spacing, steps_offset=offset,
                              skip_prk_steps=True, set_alpha_to_one=False)
    sched.set_timesteps(steps)
    sample, ref = as64(torch, x), []
    for t in sched.timesteps:
        out = torch_net(d.model.params, sample, int(t))
        if prediction == "v_prediction":
            out = math.sqrt(abar[t]) * out + math.sqrt(1 - abar[t]) * sample
        sample = sched.step(out, t, sample).prev_sample
        ref.append(sample.numpy())
    # S steps cost S + 1 evaluations in both: diffusers repeats the second timestep
    assert [c[0] for c in calls] == sched.timesteps.tolist()
    # diffusers' first step returns the Euler predictor, its second the Heun-corrected sample: ours[0]
    err = max_rel_err(ours, ref[1:])
    print(f"plms {prediction} S={steps} {spacing}+{offset}: {err:.2e}")
    assert err < BOUND["plms"], err


def test_plms_through_the_diffusion_runs_on_ldms_grid():
    """lucidrains' grid starts at T - 1, where PLMS's eps -> x0 step divides by sqrt(alpha_cumprod) ~ 0;
    a diffusion with that spacing samples PLMS on ldm's grid (leading + 1), other samplers keep it."""
    d = diffusion("epsilon")
    assert d.ddim_timestep_spacing == "lucidrains"
    assert d._sampler_options("plms", None, {}) == {"spacing": "leading", "steps_offset": 1}
    assert d._sampler_options("ddim", None, {})["spacing"] == "lucidrains"
    assert d._sampler_options("plms", None, {"spacing": "trailing", "steps_offset": 0})["spacing"] == "trailing"
    # ldm's uniform grid for T = 50, 5 steps, with exactly 5 steps
    assert sampling_timesteps(T, 5, "leading", 1)[0].tolist() == sampling_timesteps(T, 5, "uniform")[0].tolist()
    x = x_T()
    got = d.sample_with_trajectory(B, seed=0, sampler="plms", steps=6, clip_denoised=False, x_T=Tensor(x)).sample
    calls, want = run_ours(d, "plms", x, steps=6, spacing="leading", steps_offset=1)
    assert len(want) == 6 and calls[0][0] == 41
    np.testing.assert_array_equal(got.asnumpy(), want[-1])


def test_plms_warns_when_it_starts_near_zero_snr():
    d = GaussianDiffusion(FakeNet(C), image_size=(H, W), timesteps=100, beta_schedule="cosine", auto_normalize=False)
    assert math.sqrt(d.schedule.alphas_cumprod[-1]) < 1e-3
    x = x_T()
    with pytest.warns(UserWarning, match="steps_offset=1"):
        run_ours(d, "plms", x, steps=4, spacing="lucidrains")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_ours(d, "plms", x, steps=4, spacing="uniform")


# ----------------------------------------------------------------------------- DPM-Solver++


@pytest.mark.torch
@pytest.mark.parametrize("prediction,order,karras,steps,spacing,offset,clip", [
    ("epsilon", 1, False, 8, "linspace", 0, False),
    ("v_prediction", 2, False, 8, "linspace", 0, False),
    ("epsilon", 3, False, 16, "linspace", 0, False),      # >= 15 steps: no lower-order second-to-last step
    ("v_prediction", 3, False, 6, "trailing", 0, False),
    ("epsilon", 2, False, 10, "leading", 1, False),
    ("epsilon", 1, True, 5, "linspace", 0, False),
    ("epsilon", 2, True, 10, "linspace", 0, False),
    ("v_prediction", 3, True, 7, "linspace", 0, False),
    ("v_prediction", 2, True, 16, "linspace", 0, False),
    ("v_prediction", 3, True, 20, "linspace", 0, False),   # third order on Karras steps, no lower-order end
    ("epsilon", 2, False, 8, "linspace", 0, "dynamic"),   # thresholding of the data prediction
])
def test_dpmpp_matches_diffusers(torch, prediction, order, karras, steps, spacing, offset, clip):
    from diffusers import DPMSolverMultistepScheduler

    d = diffusion(prediction)
    x = x_T()
    calls, ours = run_ours(d, "dpmpp", x, clip=clip, steps=steps, order=order, karras=karras, spacing=spacing,
                           steps_offset=offset)
    sched = float64_scheduler(DPMSolverMultistepScheduler, d.schedule, prediction, algorithm_type="dpmsolver++",
                              solver_order=order, use_karras_sigmas=karras, timestep_spacing=spacing,
                              steps_offset=offset, lower_order_final=True, thresholding=clip == "dynamic",
                              dynamic_thresholding_ratio=0.9, sample_max_value=1.5)
    sched.set_timesteps(steps)
    sample, ref = as64(torch, x), []
    for t in sched.timesteps:
        sample = sched.step(torch_net(d.model.params, sample, int(t)), t, sample).prev_sample
        ref.append(sample.numpy())
    assert [c[0] for c in calls] == sched.timesteps.tolist()
    if karras:  # the network sees rounded timesteps, the conversion uses the exact Karras level
        np.testing.assert_allclose([c[1] for c in calls], [1 / (1 + float(s) ** 2) for s in sched.sigmas[:-1]],
                                   rtol=1e-6)
    err = max_rel_err(ours, ref)
    print(f"dpmpp {prediction} order={order} karras={karras} S={steps} {spacing}+{offset} clip={clip}: {err:.2e}")
    assert err < BOUND["dpmpp"], err


# ----------------------------------------------------------------------------- DDIM inversion


@pytest.mark.torch
@pytest.mark.parametrize("prediction,steps,spacing,offset", [
    ("epsilon", 10, "leading", 0),
    ("v_prediction", 8, "trailing", 0),
    ("epsilon", 5, "leading", 1),
])
def test_ddim_inversion_matches_diffusers(torch, prediction, steps, spacing, offset):
    from diffusers import DDIMInverseScheduler

    d = diffusion(prediction)
    image = np.random.default_rng(4).uniform(-1, 1, (B, C, H, W)).astype(np.float32)
    denoise = d.denoiser(B, clip_denoised=False)
    ours = []
    result = ddim_invert(denoise, d.schedule, Tensor(image), steps=steps, spacing=spacing, steps_offset=offset,
                         callback=lambda i, t, x, x0: ours.append((t, x.asnumpy())))
    sched = float64_scheduler(DDIMInverseScheduler, d.schedule, prediction, timestep_spacing=spacing,
                              steps_offset=offset, clip_sample=False, set_alpha_to_one=True)
    sched.set_timesteps(steps)
    sample, ref = as64(torch, image), []
    for t in sched.timesteps:
        sample = sched.step(torch_net(d.model.params, sample, int(t)), t, sample).prev_sample
        ref.append(sample.numpy())
    assert [t for t, _ in ours] == sched.timesteps.tolist()
    err = max_rel_err([x for _, x in ours], ref)
    print(f"ddim inversion {prediction} S={steps} {spacing}+{offset}: {err:.2e}")
    assert err < BOUND["inversion"], err
    np.testing.assert_array_equal(result.sample.asnumpy(), ours[-1][1])


def _gaussian_data_denoiser(schedule: NoiseSchedule, mean: float, std: float):
    """The exact denoiser of data ~ N(mean, std^2) (a linear function of x): DDIM on it follows the
    probability-flow ODE of that data, so inversion then sampling must come back."""
    def denoise(x, t, x_self_cond=None, alpha_cumprod=None):
        ab = float(schedule.alphas_cumprod[t]) if alpha_cumprod is None else alpha_cumprod
        a, s = math.sqrt(ab), math.sqrt(1 - ab)
        var = a * a * std ** 2 + s * s   # of x_t; E[x0 | x_t] and E[eps | x_t] are linear in x_t
        return (s / var) * (x - a * mean), mean + (a * std ** 2 / var) * (x - a * mean)
    return denoise


def test_ddim_inversion_round_trip():
    schedule = NoiseSchedule.from_name("cosine", 200)
    denoise = _gaussian_data_denoiser(schedule, 0.3, 0.5)
    image = Tensor(np.random.default_rng(0).normal(0.3, 0.5, (B, C, H, W)).astype(np.float32))
    errors = []
    for steps in (10, 50):
        noise = ddim_invert(denoise, schedule, image, steps=steps, spacing="leading").sample
        back = run_sampler("ddim", denoise, schedule, noise, np.random.default_rng(0), steps=steps,
                           spacing="leading").sample
        errors.append(float(np.abs(back.asnumpy() - image.asnumpy()).max()))
    # first-order scheme: the round-trip error shrinks with the step size (measured 0.30, 0.068)
    assert errors[1] < 0.1 and errors[1] < errors[0] / 3, errors
    # the inverted noise has the statistics of the prior
    assert abs(float(noise.asnumpy().std()) - 1.0) < 0.35


def test_gaussian_diffusion_invert_then_sample_reconstructs():
    d = diffusion("v_prediction")
    image = np.random.default_rng(2).uniform(0.2, 0.6, (B, C, H, W)).astype(np.float32)
    noise = d.invert(Tensor(image), steps=40, spacing="leading")
    direct = ddim_invert(d.denoiser(B, clip_denoised=False), d.schedule, Tensor(image), steps=40, spacing="leading")
    np.testing.assert_array_equal(noise.asnumpy(), direct.sample.asnumpy())
    back = d.sample(B, sampler="ddim", steps=40, spacing="leading", x_T=noise, eta=0.0, clip_denoised=False)
    # first-order round trip on an arbitrary (not denoising) network: close, not exact (measured 0.064)
    assert np.abs(back.asnumpy() - image).max() < 0.1


# ----------------------------------------------------------------------------- lucidrains


class _NumpyRandn:
    """Stands in for ``torch`` inside lucidrains' module: randn / randn_like replay numpy draws."""

    def __init__(self, torch, x_T, rng):
        self._torch, self._x_T, self._rng = torch, x_T, rng

    def randn(self, shape, **kw):
        return self._torch.tensor(self._x_T)

    def randn_like(self, x, **kw):
        return self._torch.tensor(self._rng.standard_normal(tuple(x.shape)).astype(np.float32))

    def __getattr__(self, name):
        return getattr(self._torch, name)


class _TorchFake:
    """FakeNet as a torch module for lucidrains' GaussianDiffusion (self-conditioned)."""

    def __new__(cls, torch, params):
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.channels, self.out_dim, self.self_condition = C, C, True
                self.random_or_learned_sinusoidal_cond = False
                self.dummy = torch.nn.Parameter(torch.zeros(1))

            def forward(self, x, t, x_self_cond=None):
                return torch_net(params, x, int(t[0]), x_self_cond)

        return Net()


@pytest.mark.torch
@pytest.mark.parametrize("steps,eta", [(T, 0.0), (12, 1.0)])
def test_self_conditioned_sampling_matches_lucidrains(torch, monkeypatch, steps, eta):
    """Whole samples (DDPM over all T; DDIM eta=1 on lucidrains' grid), pred_v, self-conditioning."""
    from tests.anchors import lucidrains
    L = lucidrains()
    d = diffusion("v_prediction", self_condition=True)
    ref = L.GaussianDiffusion(_TorchFake(torch, d.model.params), image_size=(H, W), timesteps=T,
                              sampling_timesteps=steps, objective="pred_v", beta_schedule="linear",
                              ddim_sampling_eta=eta, auto_normalize=False)
    x = x_T(7)
    monkeypatch.setattr(L, "torch", _NumpyRandn(torch, x, np.random.default_rng(11)))
    with torch.no_grad():
        expected = ref.sample(batch_size=B).numpy()
    options = dict(sampler="ddpm") if steps == T else dict(sampler="ddim", steps=steps, eta=eta)
    got = d.sample(B, seed=np.random.default_rng(11), x_T=Tensor(x), **options).asnumpy()
    err = float(np.abs(got - expected).max() / np.abs(expected).max())
    print(f"lucidrains self-conditioned {'ddpm' if steps == T else 'ddim'} eta={eta}: {err:.2e}")
    assert err < 1e-4


# ----------------------------------------------------------------------------- thresholding


def test_dynamic_threshold_matches_torch_quantile():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).normal(0, 1.5, (3, 2, 5, 7)).astype(np.float32)  # 70 values: ratio*(n-1) not whole
    for ratio, max_value in ((0.995, 1.0), (0.9, 1.7), (0.5, 3.0)):
        flat = torch.tensor(x).reshape(3, -1)
        s = torch.quantile(flat.abs(), ratio, dim=1).clamp(1, max_value)[:, None]
        want = (torch.clamp(flat, -s, s) / s).reshape(x.shape).numpy()
        got = ms.jit(dynamic_threshold)(Tensor(x), ratio, max_value).asnumpy()
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # max value 1 is static clipping
    np.testing.assert_array_equal(clip_x0(Tensor(x), "dynamic", 0.9, 1.0).asnumpy(), np.clip(x, -1, 1))
    assert resolve_clip(True) == "static" and resolve_clip(None, False) == "none"
    with pytest.raises(ValueError, match="unknown x0 clipping"):
        resolve_clip("sometimes")


# ----------------------------------------------------------------------------- grids and levels


def test_karras_grid_and_levels():
    schedule = NoiseSchedule.from_name("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012)
    sigmas = karras_sigmas(schedule, 10)
    ve = np.sqrt((1 - schedule.alphas_cumprod) / schedule.alphas_cumprod)
    assert sigmas[0] == pytest.approx(ve[-1]) and sigmas[-1] == pytest.approx(ve[0])
    assert np.all(np.diff(sigmas) < 0)
    # sigma_to_timestep inverts the schedule's sigmas exactly at integer timesteps
    assert [sigma_to_timestep(schedule, ve[t]) for t in (0, 17, 500, 999)] == pytest.approx([0, 17, 500, 999])
    ts, levels = dpmpp_grid(schedule, 10, karras=True)
    assert len(levels) == 11 and levels[-1].is_clean and ts[0] == 999
    lvl = NoiseLevel.from_ve_sigma(2.0)
    assert lvl.alpha_cumprod == pytest.approx(0.2) and lvl.ve_sigma == pytest.approx(2.0)
    assert lvl.log_snr == pytest.approx(math.log(lvl.alpha / lvl.sigma))
    # DPM-Solver++ linspace follows diffusers' own grid (S + 1 points, the final 0 dropped)
    ts, _ = dpmpp_grid(schedule, 10, spacing="linspace")
    assert ts.tolist() == [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]


# ----------------------------------------------------------------------------- every sampler end to end


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_every_sampler_through_gaussian_diffusion(name):
    d = diffusion("v_prediction")
    kwargs = dict(sampler=name, steps=6)
    a = d.sample_with_trajectory(B, seed=4, log_every_t=2, **kwargs)
    b = d.sample_with_trajectory(B, seed=4, **kwargs)
    assert a.sample.shape == (B, C, H, W) and np.isfinite(a.sample.asnumpy()).all()
    np.testing.assert_array_equal(a.sample.asnumpy(), b.sample.asnumpy())  # seeded
    # the trajectory keeps the start, every 2nd step and the last
    assert len(a.trajectory.xs) == 4 and len(b.trajectory.xs) == 0
    np.testing.assert_array_equal(a.trajectory.xs[-1], a.sample.asnumpy())
    if name != "plms":  # the last step returns the (clipped) x0 estimate; PLMS's comes from a combined eps
        assert np.abs(a.sample.asnumpy()).max() <= 1.0 + 1e-6


@pytest.mark.parametrize("name,options", [("ddpm", {}), ("ddim", dict(eta=0.0)), ("plms", {}),
                                          ("dpmpp", dict(karras=True, order=3))])
def test_inpainting_renoises_the_known_region_at_each_level(name, options):
    """ldm semantics for every sampler: before each step the known region (here: everything) is
    q_sample(x0, current level) with the next normal draw of the sampler's generator."""
    schedule = NoiseSchedule.from_name("linear", T)
    oracle = _gaussian_data_denoiser(schedule, 0.0, 0.7)
    known = np.random.default_rng(1).uniform(-1, 1, (B, C, H, W)).astype(np.float32)
    inputs, starts = [], [0]

    def denoise(x, t, sc=None, alpha_cumprod=None):
        inputs.append((x.asnumpy(), float(schedule.alphas_cumprod[t]) if alpha_cumprod is None else alpha_cumprod))
        return oracle(x, t, sc, alpha_cumprod)

    run_sampler(name, denoise, schedule, Tensor(x_T()), np.random.default_rng(3), steps=6, mask=np.ones((1, 1, H, W)),
                x0=known, callback=lambda *a: starts.append(len(inputs)), **options)
    replay = np.random.default_rng(3)
    for i, k in enumerate(starts[:-1]):
        x_in, abar = inputs[k]
        z = replay.standard_normal(known.shape).astype(np.float32)
        np.testing.assert_allclose(x_in, math.sqrt(abar) * known + math.sqrt(1 - abar) * z, atol=2e-6)
        if name == "ddpm" and i < 5:
            replay.standard_normal(known.shape)  # the step's own noise


# ----------------------------------------------------------------------------- errors


def test_clear_errors():
    d = diffusion("epsilon")
    x = Tensor(x_T())
    rng = np.random.default_rng(0)
    denoise = d.denoiser(B)
    with pytest.raises(ValueError, match="unknown sampler 'lms'"):
        run_sampler("lms", denoise, d.schedule, x, rng)
    with pytest.raises(ValueError, match=r"steps must be an integer in \[1, 50\]"):
        run_sampler("ddim", denoise, d.schedule, x, rng, steps=51)
    with pytest.raises(ValueError, match="order must be one of"):
        run_sampler("dpmpp", denoise, d.schedule, x, rng, steps=5, order=4)
    with pytest.raises(ValueError, match=r"does not take option\(s\) \['eta'\]"):
        run_sampler("plms", denoise, d.schedule, x, rng, steps=5, eta=0.5)
    with pytest.raises(ValueError, match="unknown timestep spacing"):
        run_sampler("ddpm", denoise, d.schedule, x, rng, steps=5, spacing="cubic")
    with pytest.raises(ValueError, match="strictly decreasing"):
        run_sampler("ddim", denoise, d.schedule, x, rng, timesteps=[10, 20])
    with pytest.raises(ValueError, match="both `mask` and `x0`"):
        run_sampler("ddim", denoise, d.schedule, x, rng, steps=5, mask=np.ones((1, 1, H, W)))
    with pytest.raises(ValueError, match="noise_dropout"):
        run_sampler("ddpm", denoise, d.schedule, x, rng, noise_dropout=1.0)
    with pytest.raises(ValueError, match="at most 49 steps"):
        run_sampler("dpmpp", denoise, d.schedule, x, rng, steps=50)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        karras_sigmas(NoiseSchedule.from_name("linear", 50, zero_terminal_snr=True), 5)
    with pytest.raises(ValueError, match="guidance_rescale only acts"):
        d.denoiser(B, guidance_rescale=0.5)
    with pytest.raises(ValueError, match="sampler 'ddpm' does not take"):
        d.sample(B, sampler="ddpm", order=2)
    assert resolve_sampler("DPM-Solver++") == "dpmpp" and resolve_sampler("pndm") == "plms"
    assert "karras" in sampler_options("dpmpp") and "mask" in sampler_options("plms")
