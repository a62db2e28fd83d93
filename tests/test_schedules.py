"""Schedule math against an independent numpy reference written here, and against the anchors."""
import math

import numpy as np
import pytest

from ms_diffusion.schedules import (BETA_SCHEDULES, NoiseSchedule, make_beta_schedule, rescale_zero_terminal_snr,
                                    sampling_timesteps)

TS = (10, 1000)


def _T(name, T):
    """lucidrains' linear schedule is invalid below T=21 (see test_linear_needs_enough_steps)."""
    return 25 if (name == "linear" and T == 10) else T


# ---------------------------------------------------------------- independent reference (loops, float64)

def ref_betas(name, T):
    if name == "linear":
        s = 1000 / T
        return np.array([s * 1e-4 + i * (s * 0.02 - s * 1e-4) / (T - 1) for i in range(T)])
    if name in ("scaled_linear", "ldm_linear"):
        a, b = math.sqrt(1e-4), math.sqrt(0.02)
        return np.array([(a + i * (b - a) / (T - 1)) ** 2 for i in range(T)])
    if name == "sqrt_linear":
        return np.array([1e-4 + i * (0.02 - 1e-4) / (T - 1) for i in range(T)])
    if name == "sqrt":
        return np.array([math.sqrt(1e-4 + i * (0.02 - 1e-4) / (T - 1)) for i in range(T)])
    if name == "cosine":
        f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return np.array([min(1 - f(i + 1) / f(i), 0.999) for i in range(T)])
    if name == "sigmoid":
        sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
        g = lambda t: (-sig((t / T) * 6 - 3) + sig(3)) / (sig(3) - sig(-3))  # noqa: E731
        return np.array([min(max(1 - g(i + 1) / g(i), 0.0), 0.999) for i in range(T)])
    raise KeyError(name)


def ref_arrays(betas, v_posterior=0.0):
    T = len(betas)
    out = {k: np.zeros(T) for k in ("abar", "abar_prev", "post_var", "post_logvar", "c1", "c2", "snr")}
    prod = 1.0
    for t in range(T):
        prev = prod
        prod *= 1 - betas[t]
        out["abar"][t], out["abar_prev"][t] = prod, prev
        var = (1 - v_posterior) * betas[t] * (1 - prev) / (1 - prod) + v_posterior * betas[t]
        out["post_var"][t] = var
        out["post_logvar"][t] = math.log(max(var, 1e-20))
        out["c1"][t] = betas[t] * math.sqrt(prev) / (1 - prod)
        out["c2"][t] = (1 - prev) * math.sqrt(1 - betas[t]) / (1 - prod)
        out["snr"][t] = prod / (1 - prod)
    return out


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("name", sorted(BETA_SCHEDULES))
def test_betas_match_reference(name, T):
    T = _T(name, T)
    np.testing.assert_allclose(make_beta_schedule(name, T), ref_betas(name, T), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("name", sorted(BETA_SCHEDULES))
@pytest.mark.parametrize("v_posterior", [0.0, 0.3])
def test_derived_arrays_match_reference(name, T, v_posterior):
    T = _T(name, T)
    s = NoiseSchedule.from_name(name, T, v_posterior=v_posterior)
    r = ref_arrays(ref_betas(name, T), v_posterior)
    np.testing.assert_allclose(s.alphas_cumprod, r["abar"], rtol=1e-10)
    np.testing.assert_allclose(s.alphas_cumprod_prev, r["abar_prev"], rtol=1e-10)
    np.testing.assert_allclose(s.sqrt_alphas_cumprod, np.sqrt(r["abar"]), rtol=1e-10)
    np.testing.assert_allclose(s.sqrt_one_minus_alphas_cumprod, np.sqrt(1 - r["abar"]), rtol=1e-10)
    np.testing.assert_allclose(s.log_one_minus_alphas_cumprod, np.log(1 - r["abar"]), rtol=1e-10)
    np.testing.assert_allclose(s.sqrt_recip_alphas_cumprod, 1 / np.sqrt(r["abar"]), rtol=1e-10)
    np.testing.assert_allclose(s.sqrt_recipm1_alphas_cumprod, np.sqrt(1 / r["abar"] - 1), rtol=1e-10)
    np.testing.assert_allclose(s.posterior_variance, r["post_var"], rtol=1e-10, atol=1e-300)
    np.testing.assert_allclose(s.posterior_log_variance_clipped, r["post_logvar"], rtol=1e-10)
    np.testing.assert_allclose(s.posterior_mean_coef1, r["c1"], rtol=1e-10)
    np.testing.assert_allclose(s.posterior_mean_coef2, r["c2"], rtol=1e-10)
    np.testing.assert_allclose(s.snr, r["snr"], rtol=1e-10)


@pytest.mark.parametrize("T", TS)
def test_loss_weights(T):
    s = NoiseSchedule.from_name("cosine", T)
    snr = ref_arrays(ref_betas("cosine", T))["snr"]
    clipped = np.minimum(snr, 5.0)
    np.testing.assert_allclose(s.loss_weight("pred_noise"), np.ones(T), rtol=1e-12)
    np.testing.assert_allclose(s.loss_weight("pred_noise", 5.0), clipped / snr, rtol=1e-10)
    np.testing.assert_allclose(s.loss_weight("pred_x0", 5.0), clipped, rtol=1e-10)
    np.testing.assert_allclose(s.loss_weight("pred_v", 5.0), clipped / (snr + 1), rtol=1e-10)
    np.testing.assert_allclose(s.p2_loss_weight(1.0, 0.5), (1 + snr) ** -0.5, rtol=1e-10)
    np.testing.assert_allclose(s.p2_loss_weight(), np.ones(T))
    with pytest.raises(ValueError, match="objective"):
        s.loss_weight("eps")


@pytest.mark.parametrize("T", TS)
def test_lvlb_weights_are_the_elbo_weights(T):
    """Each weight times the MSE of its parameterisation equals the KL between Gaussian posteriors."""
    s = NoiseSchedule.from_name("cosine", T)
    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal(8), rng.standard_normal(8)
    x0_hat, eps_hat = rng.standard_normal(8), rng.standard_normal(8)
    for t in range(1, T):
        ab, sig2 = s.alphas_cumprod[t], s.posterior_variance[t]
        xt = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps
        mu = lambda x0_: s.posterior_mean_coef1[t] * x0_ + s.posterior_mean_coef2[t] * xt  # noqa: E731
        from_eps = lambda e: (xt - math.sqrt(1 - ab) * e) / math.sqrt(ab)  # noqa: E731
        kl = lambda a: np.sum((mu(x0) - mu(a)) ** 2) / (2 * sig2)  # noqa: E731
        v, v_hat = math.sqrt(ab) * eps - math.sqrt(1 - ab) * x0, math.sqrt(ab) * eps_hat - math.sqrt(1 - ab) * x0
        assert np.isclose(s.lvlb_weights("pred_noise")[t] * np.sum((eps - eps_hat) ** 2), kl(from_eps(eps_hat)),
                          rtol=1e-8)
        assert np.isclose(s.lvlb_weights("pred_x0")[t] * np.sum((x0 - x0_hat) ** 2), kl(x0_hat), rtol=1e-8)
        x0_from_v = math.sqrt(ab) * xt - math.sqrt(1 - ab) * v_hat
        assert np.isclose(s.lvlb_weights("pred_v")[t] * np.sum((v - v_hat) ** 2), kl(x0_from_v), rtol=1e-8)
    assert s.lvlb_weights("pred_noise")[0] == s.lvlb_weights("pred_noise")[1]


def test_zero_terminal_snr():
    betas = make_beta_schedule("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012)
    rescaled = rescale_zero_terminal_snr(betas)
    abar = np.cumprod(1 - rescaled)
    assert abar[-1] == pytest.approx(0.0, abs=1e-12)
    assert math.sqrt(abar[0]) == pytest.approx(math.sqrt(1 - betas[0]), rel=1e-12)
    assert NoiseSchedule(rescaled).has_zero_terminal_snr


def test_linear_needs_enough_steps():
    with pytest.raises(ValueError, match="needs T > 20"):
        make_beta_schedule("linear", 10)


def test_schedule_errors():
    with pytest.raises(ValueError, match="unknown beta schedule 'cosin'"):
        make_beta_schedule("cosin", 10)
    with pytest.raises(ValueError, match="bad parameters"):
        make_beta_schedule("cosine", 10, tau=2)
    with pytest.raises(ValueError, match="positive"):
        make_beta_schedule("linear", 0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        NoiseSchedule([0.5, 1.5])


# ---------------------------------------------------------------- timestep spacings

@pytest.mark.parametrize("T,S", [(1000, 50), (1000, 1000), (1000, 7), (1000, 999), (10, 3), (250, 33), (10, 10)])
def test_lucidrains_spacing_matches_torch(T, S):
    torch = pytest.importorskip("torch")
    ts, prev = sampling_timesteps(T, S, "lucidrains")
    times = list(reversed(torch.linspace(-1, T - 1, steps=S + 1).int().tolist()))
    pairs = list(zip(times[:-1], times[1:]))
    assert [int(t) for t in ts] == [a for a, _ in pairs]
    assert [int(p) for p in prev] == [max(b, -1) for _, b in pairs]


@pytest.mark.parametrize("T,S", [(1000, 50), (1000, 20), (100, 7), (1000, 4)])
def test_ldm_spacings(T, S):
    ts, prev = sampling_timesteps(T, S, "uniform")
    c = T // S
    expected = [i + 1 for i in range(0, T, c)][::-1]
    assert ts.tolist() == expected and prev.tolist() == expected[1:] + [-1]
    ts, _ = sampling_timesteps(T, S, "quad")
    expected = [int(x) + 1 for x in (np.linspace(0, math.sqrt(T * 0.8), S) ** 2)][::-1]
    assert ts.tolist() == expected


@pytest.mark.parametrize("T,S,offset", [(1000, 50, 1), (1000, 3, 0), (1000, 7, 1), (100, 30, 0)])
def test_diffusers_spacings(T, S, offset):
    ts, prev = sampling_timesteps(T, S, "leading", steps_offset=offset)
    assert ts.tolist() == [i * (T // S) + offset for i in range(S)][::-1]
    assert prev.tolist() == [max(t - T // S, -1) for t in ts.tolist()]
    ts, _ = sampling_timesteps(T, S, "trailing")
    assert ts.tolist() == [int(round(T - i * T / S)) - 1 for i in range(S)]
    ts, _ = sampling_timesteps(T, S, "linspace")
    assert ts.tolist() == [int(round(x)) for x in np.linspace(0, T - 1, S)][::-1]


def test_spacing_errors():
    with pytest.raises(ValueError, match="unknown timestep spacing"):
        sampling_timesteps(100, 10, "even")
    with pytest.raises(ValueError, match="num_steps"):
        sampling_timesteps(100, 101)
    with pytest.raises(ValueError, match="outside"):
        sampling_timesteps(100, 100, "uniform")
    with pytest.raises(ValueError, match="outside"):  # ldm: range(0, 1000, 333) + 1 reaches t = 1000
        sampling_timesteps(1000, 3, "uniform")


# ---------------------------------------------------------------- against lucidrains' registered buffers

@pytest.mark.torch
@pytest.mark.parametrize("schedule", ["linear", "cosine", "sigmoid"])
@pytest.mark.parametrize("T", (25, 1000))
def test_buffers_match_lucidrains(schedule, T):
    from tests.anchors import lucidrains
    L = lucidrains()
    unet = L.Unet(dim=8, dim_mults=(1,), channels=1)
    ref = L.GaussianDiffusion(unet, image_size=8, timesteps=T, beta_schedule=schedule, objective="pred_v",
                              min_snr_loss_weight=True)
    s = NoiseSchedule.from_name(schedule, T)
    # lucidrains' sigmoid takes sigmoid(start/tau), sigmoid(end/tau) of float32 tensors; we stay in float64,
    # which moves the last betas by up to ~1.3e-5 relative
    rtol = 3e-5 if schedule == "sigmoid" else 2e-6
    for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                 "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                 "posterior_mean_coef1", "posterior_mean_coef2"):
        np.testing.assert_allclose(getattr(s, name).astype(np.float32), getattr(ref, name).numpy(), rtol=rtol,
                                   atol=1e-30, err_msg=name)
    np.testing.assert_allclose(s.loss_weight("pred_v", 5).astype(np.float32), ref.loss_weight.numpy(), rtol=rtol)
