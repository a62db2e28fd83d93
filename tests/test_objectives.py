"""EDM and flow matching: training losses against the papers' formulas written here in numpy, samplers against
diffusers' ``EDMEulerScheduler`` / ``FlowMatchEulerDiscreteScheduler`` step by step on the same network outputs,
EDM's stochastic Heun (Algorithm 2) against an independent float64 implementation, guidance, every sampler.

The network is a fixed smooth function of (x, label) written as a MindSpore Cell and in numpy / torch float64;
each loop evaluates it on its own samples.
"""
from __future__ import annotations

import math

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn, ops

from ms_diffusion import EDMDiffusion, FlowMatching
from ms_diffusion.samplers import SAMPLER_NAMES, run_sampler
from tests.test_samplers import torch  # noqa: F401  (the torch + diffusers fixture)
from tests.test_samplers_sigma import recording_denoiser

B, C, H, W = 2, 2, 3, 3
_P = {k: np.random.default_rng(1).uniform(lo, hi, C).reshape(1, C, 1, 1)
      for k, lo, hi in (("w1", 0.5, 1.2), ("w2", -1.0, 1.0), ("phase", 0.0, 3.0), ("a", 0.5, 0.9), ("w3", 0.1, 0.4),
                        ("wc", -0.5, 0.5))}


class FakeNet(nn.Cell):
    """F = a sin(w1 x + w2 sin(label * freq + phase)) + w3 x (+ wc * class for a class-conditional net)."""

    def __init__(self, freq: float, num_classes=None):
        super().__init__()
        self.channels, self.out_dim, self.self_condition = C, C, False
        self.num_classes, self.cond_drop_prob = num_classes, 0.0
        self.freq = float(freq)
        for k, v in _P.items():
            setattr(self, "p_" + k, Tensor(v.astype(np.float32)))

    def construct(self, x, time, x_self_cond=None, classes=None):
        tf = time.astype(ms.float32).reshape(-1, 1, 1, 1) * self.freq
        out = self.p_a * ops.sin(self.p_w1 * x + self.p_w2 * ops.sin(tf + self.p_phase)) + self.p_w3 * x
        if classes is not None:
            out = out + self.p_wc * classes.astype(ms.float32).reshape(-1, 1, 1, 1)
        return out


def net_np(x, label, freq, xp=np):
    p = {k: xp.asarray(v) if xp is np else xp.tensor(v, dtype=xp.float64) for k, v in _P.items()}
    return p["a"] * xp.sin(p["w1"] * x + p["w2"] * xp.sin(label * freq + p["phase"])) + p["w3"] * x


# ---------------------------------------------------------------------------------------------- EDM

SIGMA_DATA = 0.6
EDM_FREQ = 1.3


def edm(**kw) -> EDMDiffusion:
    return EDMDiffusion(FakeNet(EDM_FREQ, kw.pop("num_classes", None)), image_size=(H, W), sigma_data=SIGMA_DATA,
                        auto_normalize=False, **kw)


def edm_denoiser_np(x, sigma):
    """D(x; sigma) of the EDM paper, Table 1 (float64)."""
    c_skip = SIGMA_DATA ** 2 / (sigma ** 2 + SIGMA_DATA ** 2)
    c_out = sigma * SIGMA_DATA / np.sqrt(sigma ** 2 + SIGMA_DATA ** 2)
    c_in = 1.0 / np.sqrt(SIGMA_DATA ** 2 + sigma ** 2)
    return c_skip * x + c_out * net_np(c_in * x, np.log(sigma) / 4.0, EDM_FREQ)


def per_sample_loss(d, times, seed):
    """(d's per-sample training loss at ``times``, the batch x0, the noise): float64 inputs, cast for the model."""
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(-1, 1, (len(times), C, H, W))
    noise = rng.standard_normal((len(times), C, H, W))
    loss = d.training_loss(Tensor(x0.astype(np.float32)), times=Tensor(np.asarray(times, np.float32)),
                           noise=Tensor(noise.astype(np.float32)), loss_reduction="none").asnumpy()
    return loss, x0, noise


def test_edm_loss_is_the_papers():
    d = edm()
    sigma = np.array([0.003, 0.2, 1.5, 60.0])
    loss, x0, noise = per_sample_loss(d, sigma, 0)
    s = sigma.reshape(-1, 1, 1, 1)
    weight = (sigma ** 2 + SIGMA_DATA ** 2) / (sigma * SIGMA_DATA) ** 2
    ref = weight * ((edm_denoiser_np(x0 + s * noise, s) - x0) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(loss, ref, rtol=2e-5)
    # the training sigmas: ln sigma ~ N(P_mean, P_std^2)
    draws = np.log(d.training_inputs(np.zeros((20000, C, H, W), np.float32), np.random.default_rng(1))["times"])
    assert abs(draws.mean() - d.P_mean) < 0.03 and abs(draws.std() - d.P_std) < 0.03


def test_edm_denoiser_is_the_papers_at_any_level():
    d = edm()
    x = np.random.default_rng(2).standard_normal((B, C, H, W))
    denoise = d.denoiser(B)
    for sigma in (0.002, 0.37, 80.0):
        abar = 1.0 / (1.0 + sigma ** 2)
        eps, x0 = denoise(Tensor((x * math.sqrt(abar)).astype(np.float32)), 0, None, alpha_cumprod=abar)
        ref = edm_denoiser_np(x, sigma)   # x: the VE sample x0 + sigma eps; the denoiser takes model space
        np.testing.assert_allclose(x0.asnumpy(), ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
        np.testing.assert_allclose(eps.asnumpy(), (x - ref) / sigma, rtol=2e-4, atol=2e-4)


@pytest.mark.torch
@pytest.mark.parametrize("steps", [4, 9])
def test_edm_euler_matches_diffusers(torch, steps):
    import diffusers

    d = edm()
    x = np.random.default_rng(3).standard_normal((B, C, H, W)).astype(np.float32)
    logged, calls = recording_denoiser(d)
    ours = []

    run_sampler("euler", logged, d.schedule, Tensor(x), np.random.default_rng(0), steps=steps,
                **d._sampler_options("euler", None, {}), callback=lambda i, t, x, x0: ours.append(x.asnumpy()))
    sched = diffusers.EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=SIGMA_DATA)
    sched.set_timesteps(steps)
    labels = [math.log(math.sqrt((1.0 - ac) / ac)) / 4.0 for _, ac in calls]   # c_noise = ln(sigma) / 4
    np.testing.assert_allclose(labels, sched.timesteps.numpy(), rtol=1e-6, atol=1e-7)
    sample = torch.tensor(x, dtype=torch.float64) * sched.init_noise_sigma
    worst = 0.0
    for i, t in enumerate(sched.timesteps):
        model_in = sched.scale_model_input(sample, t)
        out = net_np(model_in, float(t), EDM_FREQ, xp=torch)
        sample = sched.step(out, t, sample).prev_sample.double()
        nxt = float(sched.sigmas[i + 1])
        ref = sample.numpy() / math.sqrt(1.0 + nxt ** 2)    # our model space
        worst = max(worst, float(np.abs(ours[i] - ref).max() / np.abs(ref).max()))
    assert worst < 3e-6, worst   # measured 1.1e-6 (4 steps), 3.0e-7 (9 steps); diffusers steps in float32


def heun_algorithm2_np(x_T, steps, churn, s_noise, noise_rng):
    """EDM Algorithm 2 (stochastic Heun) with Karras sigmas, float64, noise replayed from ``noise_rng``."""
    i = np.arange(steps)
    t = (80.0 ** (1 / 7) + i / (steps - 1) * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    t = np.append(t, 0.0)
    x = x_T * math.sqrt(1.0 + t[0] ** 2)
    for k in range(steps):
        gamma = min(churn / steps, math.sqrt(2) - 1)
        t_hat = t[k] * (1 + gamma)
        z = noise_rng.standard_normal(x.shape).astype(np.float32).astype(np.float64)
        x_hat = x + math.sqrt(t_hat ** 2 - t[k] ** 2) * s_noise * z
        d = (x_hat - edm_denoiser_np(x_hat, t_hat)) / t_hat
        x = x_hat + (t[k + 1] - t_hat) * d
        if t[k + 1] != 0:
            d2 = (x - edm_denoiser_np(x, t[k + 1])) / t[k + 1]
            x = x_hat + (t[k + 1] - t_hat) * (0.5 * d + 0.5 * d2)
    return x


@pytest.mark.parametrize("churn,s_noise", [(0.0, 1.0), (7.0, 1.003)])
def test_edm_heun_is_algorithm_2(churn, s_noise):
    d = edm()
    x = np.random.default_rng(4).standard_normal((B, C, H, W)).astype(np.float32)
    steps = 6
    got = run_sampler("heun", d.denoiser(B), d.schedule, Tensor(x), np.random.default_rng(9), steps=steps,
                      s_churn=churn, s_noise=s_noise, **d._sampler_options("heun", None, {})).sample.asnumpy()
    ref = heun_algorithm2_np(x.astype(np.float64), steps, churn, s_noise, np.random.default_rng(9))
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * np.abs(ref).max())
    assert d.sampling_plan() == ("heun", 18)


def test_churn_options_are_checked():
    d = edm()
    with pytest.raises(ValueError, match="s_churn >= 0"):
        d.sample(1, sampler="heun", steps=2, s_churn=-1.0)


# ---------------------------------------------------------------------------------------------- flow matching

FLOW_FREQ = 0.004


def flow(**kw) -> FlowMatching:
    return FlowMatching(FakeNet(FLOW_FREQ, kw.pop("num_classes", None)), image_size=(H, W), auto_normalize=False,
                        **kw)


def test_flow_loss_and_time_sampling():
    d = flow(shift=3.0)
    t = np.array([0.0, 0.25, 0.7, 1.0])
    loss, x0, noise = per_sample_loss(d, t, 5)
    tt = t.reshape(-1, 1, 1, 1)
    x_t = (1 - tt) * x0 + tt * noise
    ref = ((net_np(x_t, 1000.0 * tt, FLOW_FREQ) - (noise - x0)) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(loss, ref, rtol=2e-5)
    # logit-normal t, then SD3's shift: P(shifted t < shift(u)) = P(t < u)
    times = d.training_inputs(np.zeros((20000, C, H, W), np.float32), np.random.default_rng(1))["times"]
    unshifted = times / (3.0 - 2.0 * times)
    logits = np.log(unshifted / (1 - unshifted))
    assert abs(logits.mean()) < 0.03 and abs(logits.std() - 1.0) < 0.03
    uniform = flow(time_sampling="uniform").training_inputs(np.zeros((20000, 1, 1, 1)), np.random.default_rng(2))
    assert abs(uniform["times"].mean() - 0.5) < 0.01 and uniform["times"].min() >= 0 and uniform["times"].max() < 1


@pytest.mark.torch
@pytest.mark.parametrize("shift,steps", [(1.0, 5), (3.0, 8)])
def test_flow_euler_matches_diffusers(torch, shift, steps):
    import diffusers

    d = flow(shift=shift)
    x = np.random.default_rng(6).standard_normal((B, C, H, W)).astype(np.float32)
    logged, calls = recording_denoiser(d)
    ours = []

    name, _ = d.sampling_plan()
    assert name == "flow_euler"
    run_sampler(name, logged, d.schedule, Tensor(x), np.random.default_rng(0), steps=steps,
                **d._sampler_options(name, None, {}), callback=lambda i, t, x, x0: ours.append(x.asnumpy()))
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(steps)
    labels = [1000.0 * math.sqrt(1 - ac) / (math.sqrt(ac) + math.sqrt(1 - ac)) for _, ac in calls]   # 1000 t
    np.testing.assert_allclose(labels, sched.timesteps.numpy(), rtol=2e-6)
    sample = torch.tensor(x, dtype=torch.float64)
    worst = 0.0
    for i, t in enumerate(sched.timesteps):
        out = net_np(sample, float(t), FLOW_FREQ, xp=torch)
        sample = sched.step(out, t, sample).prev_sample.double()
        s = float(sched.sigmas[i + 1])
        ref = sample.numpy() / math.sqrt((1 - s) ** 2 + s ** 2)     # flow x -> our model space
        worst = max(worst, float(np.abs(ours[i] - ref).max() / np.abs(ref).max()))
    assert worst < 5e-7, worst   # measured 8.4e-8 (shift 1, 5 steps), 1.6e-7 (shift 3, 8 steps)


# ---------------------------------------------------------------------------------------------- both

@pytest.mark.parametrize("make", [edm, flow], ids=["edm", "flow"])
def test_guidance_combines_network_outputs(make):
    d = make(num_classes=3)
    x = Tensor(np.random.default_rng(7).standard_normal((B, C, H, W)).astype(np.float32))
    t = d.schedule.num_timesteps // 2
    cond = d.denoiser(B, classes=[0, 2])(x, t)[1].asnumpy()
    uncond = d.denoiser(B, classes=[3, 3])(x, t)[1].asnumpy()
    guided = d.denoiser(B, classes=[0, 2], guidance_scale=2.5)(x, t)[1].asnumpy()
    np.testing.assert_allclose(guided, uncond + 2.5 * (cond - uncond), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [edm, flow], ids=["edm", "flow"])
def test_every_sampler_runs(make):
    d = make()
    for name in SAMPLER_NAMES:
        out = d.sample(B, seed=0, sampler=name, steps=20 if name == "ddpm" else 4).asnumpy()
        assert out.shape == (B, C, H, W) and np.isfinite(out).all(), name


@pytest.mark.parametrize("make", [edm, flow], ids=["edm", "flow"])
def test_in_graph_loss_draws_its_own_inputs(make):
    d = make()
    img = Tensor(np.random.default_rng(8).uniform(-1, 1, (B, C, H, W)).astype(np.float32))

    @ms.jit
    def step(x):
        return d(x)

    loss = step(img)
    assert np.isfinite(float(loss)) and float(loss) > 0
