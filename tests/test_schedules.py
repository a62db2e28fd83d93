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

# The grids below come from the anchors themselves: lucidrains' GaussianDiffusion.ddim_sample (instrumented),
# diffusers' DDIMScheduler (set_timesteps, and the alphas its step() reads), and ldm's make_ddim_timesteps /
# make_ddim_sampling_parameters, which cannot be installed and are written out here as latent-diffusion's
# ldm/modules/diffusionmodules/util.py has them.
GRID_CASES = [(1000, 50), (1000, 1000), (1000, 999), (1000, 7), (1000, 3), (1000, 4), (100, 30), (100, 7),
              (250, 33), (10, 3), (10, 10), (999, 20)]


class _IndexLog:
    """Stands in for an anchor's alphas_cumprod and records which timesteps the sampler reads."""

    def __init__(self, values):
        self.values, self.seen = values, []

    def __getitem__(self, index):
        self.seen.append(int(index))
        return self.values[index]


@pytest.mark.torch
@pytest.mark.parametrize("T,S", GRID_CASES)
def test_lucidrains_spacing_matches_its_ddim_sample(T, S):
    torch = pytest.importorskip("torch")
    from tests.anchors import lucidrains

    L = lucidrains()

    class Zero(torch.nn.Module):
        channels, out_dim, self_condition = 1, 1, False

        def forward(self, x, t, x_self_cond=None):
            return torch.zeros_like(x)

    gd = L.GaussianDiffusion(Zero(), image_size=1, timesteps=T, sampling_timesteps=S, beta_schedule="cosine",
                             objective="pred_noise")
    steps = []                                   # per step: [time, alphas_cumprod indices read...]

    class Reads(_IndexLog):
        def __getitem__(self, index):
            steps[-1].append(int(index))
            return self.values[index]

    alphas = gd.alphas_cumprod.clone()
    del gd._buffers["alphas_cumprod"]
    gd.alphas_cumprod = Reads(alphas)            # ddim_sample reads alphas_cumprod[time] and [time_next]

    def model_predictions(x, t, *args, **kwargs):
        steps.append([int(t[0])])                # each step starts with the prediction at `time`
        return torch.zeros_like(x), torch.zeros_like(x)   # (pred_noise, x_start)

    gd.model_predictions = model_predictions
    gd.ddim_sample((1, 1, 1, 1))
    times = [s[0] for s in steps]
    # alphas read per step: [time, time_next], or none at the last step (time_next < 0: x_start returned)
    nexts = [s[2] if len(s) == 3 else -1 for s in steps]
    assert all(len(s) == 3 and s[1] == s[0] for s in steps[:-1]) and len(steps[-1]) == 1, steps[:3]
    ts, prev = sampling_timesteps(T, S, "lucidrains")
    assert ts.tolist() == times
    assert prev.tolist() == nexts


def _ldm_make_ddim_timesteps(method, num_ddim_timesteps, num_ddpm_timesteps):
    """ldm.modules.diffusionmodules.util.make_ddim_timesteps (ascending), as latent-diffusion writes it."""
    if method == "uniform":
        c = num_ddpm_timesteps // num_ddim_timesteps
        ddim_timesteps = np.asarray(list(range(0, num_ddpm_timesteps, c)))
    elif method == "quad":
        ddim_timesteps = ((np.linspace(0, np.sqrt(num_ddpm_timesteps * .8), num_ddim_timesteps)) ** 2).astype(int)
    else:
        raise NotImplementedError(method)
    return ddim_timesteps + 1   # "add one to get the final alpha values right"


@pytest.mark.parametrize("method", ["uniform", "quad"])
@pytest.mark.parametrize("T,S", GRID_CASES)
def test_ldm_spacings_match_make_ddim_timesteps(method, T, S):
    ldm = _ldm_make_ddim_timesteps(method, S, T)
    if ldm.max() >= T:   # ldm would index alphas_cumprod[T]: ours refuses the grid instead
        with pytest.raises(ValueError, match="outside"):
            sampling_timesteps(T, S, method)
        return
    ts, prev = sampling_timesteps(T, S, method)
    assert ts.tolist() == ldm[::-1].tolist()   # DDIMSampler walks np.flip(ddim_timesteps)
    # make_ddim_sampling_parameters: alphas_prev = [alphacums[0]] + alphacums[ddim_timesteps[:-1]]; the first
    # entry is "the end" (-1 here: the sampler's final alpha_cumprod is alphas_cumprod[0] for ldm)
    assert prev.tolist() == ([-1] + ldm[:-1].tolist())[::-1]


def _diffusers_ddim_grid(T, S, spacing, offset):
    """(timesteps, prev) of diffusers' DDIMScheduler: set_timesteps, then the alphas each step() reads."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
    sched.set_timesteps(S)
    timesteps = [int(t) for t in sched.timesteps]
    if max(timesteps) >= T:
        return timesteps, None
    log = _IndexLog(sched.alphas_cumprod)
    sched.alphas_cumprod = log
    prev = []
    for t in timesteps:
        log.seen.clear()
        sched.step(torch.zeros(1), t, torch.ones(1))
        others = {i for i in log.seen if i != t}
        assert len(others) <= 1, log.seen
        prev.append(others.pop() if others else -1)   # none read: final_alpha_cumprod
    return timesteps, prev


@pytest.mark.torch
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("T,S", GRID_CASES)
def test_diffusers_spacings_match_ddim_scheduler(T, S, spacing, offset):
    want, want_prev = _diffusers_ddim_grid(T, S, spacing, offset)
    # diffusers adds steps_offset to the leading grid only; ours applies it to whichever spacing is named
    ours_offset = offset if spacing == "leading" else 0
    if want_prev is None:   # diffusers' grid reaches t = T, where its step() would index past alphas_cumprod
        with pytest.raises(ValueError, match="outside"):
            sampling_timesteps(T, S, spacing, steps_offset=ours_offset)
        return
    ts, prev = sampling_timesteps(T, S, spacing, steps_offset=ours_offset)
    assert ts.tolist() == want
    assert prev.tolist() == want_prev


@pytest.mark.torch
@pytest.mark.parametrize("T,S", GRID_CASES)
def test_leading_plus_one_is_ldm_uniform(T, S):
    """diffusers' leading + steps_offset=1 (the SD v1 scheduler config) is ldm's uniform grid: exactly when ldm's
    grid has S entries; otherwise ldm's has more (range(0, T, T // S) overshoots S) and diffusers' is its start."""
    leading, _ = _diffusers_ddim_grid(T, S, "leading", 1)
    ldm = _ldm_make_ddim_timesteps("uniform", S, T).tolist()
    assert leading[::-1] == ldm[:S]
    assert (leading[::-1] == ldm) == (len(ldm) == S)
    if len(ldm) == S and max(ldm) < T:
        assert sampling_timesteps(T, S, "leading", steps_offset=1)[0].tolist() == \
            sampling_timesteps(T, S, "uniform")[0].tolist()


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
