import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

from ms_diffusion import GaussianDiffusion, Unet
from ms_diffusion.diffusion.assignment import pairwise_distances
from ms_diffusion.interop import LUCIDRAINS_UNET_TO_MS, load_arrays_into


def tiny(objective="pred_v", T=100, **kwargs):
    unet_kwargs = {k: kwargs.pop(k) for k in ("self_condition", "learned_variance", "num_classes") if k in kwargs}
    model = Unet(dim=8, dim_mults=(1, 2), channels=1, **unet_kwargs)
    return GaussianDiffusion(model, image_size=8, timesteps=T, objective=objective, **kwargs)


def rand(shape, seed=0):
    return Tensor(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def test_conversions_round_trip():
    d = tiny(beta_schedule="cosine")
    x0, eps = rand((4, 1, 8, 8), 1), rand((4, 1, 8, 8), 2)
    t = Tensor(np.array([0, 10, 50, 99], np.int32))
    xt = d.q_sample(x0, t, eps)
    # at t=99 sqrt(1/abar) ~ 300 amplifies float32 rounding of x_t
    np.testing.assert_allclose(d.predict_start_from_noise(xt, t, eps).asnumpy(), x0.asnumpy(), atol=1e-3)
    np.testing.assert_allclose(d.predict_noise_from_start(xt, t, x0).asnumpy(), eps.asnumpy(), atol=2e-3)
    v = d.predict_v(x0, t, eps)
    np.testing.assert_allclose(d.predict_start_from_v(xt, t, v).asnumpy(), x0.asnumpy(), atol=1e-5)
    # posterior mean / variance against the closed form in float64
    mean, var, logvar = d.q_posterior(x0, xt, t)
    s = d.schedule
    for i, ti in enumerate([0, 10, 50, 99]):
        ab, ab_prev, beta = s.alphas_cumprod[ti], s.alphas_cumprod_prev[ti], s.betas[ti]
        want = (np.sqrt(ab_prev) * beta / (1 - ab) * x0.asnumpy()[i]
                + np.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab) * xt.asnumpy()[i])
        np.testing.assert_allclose(mean.asnumpy()[i], want, rtol=1e-4, atol=1e-5)
        assert var.asnumpy()[i, 0, 0, 0] == pytest.approx((1 - ab_prev) / (1 - ab) * beta, rel=1e-5, abs=1e-12)
        assert logvar.asnumpy()[i, 0, 0, 0] == pytest.approx(np.log(max((1 - ab_prev) / (1 - ab) * beta, 1e-20)),
                                                             rel=1e-5)


@pytest.mark.torch
@pytest.mark.parametrize("objective,kw", [("pred_noise", {}), ("pred_noise", dict(min_snr_loss_weight=True)),
                                          ("pred_x0", {}), ("pred_x0", dict(min_snr_loss_weight=True)),
                                          ("pred_v", {}), ("pred_v", dict(min_snr_loss_weight=True, min_snr_gamma=3))])
def test_loss_parity_with_lucidrains(objective, kw):
    import torch

    from tests.anchors import lucidrains
    L = lucidrains()
    torch.manual_seed(0)
    ref_unet = L.Unet(dim=8, dim_mults=(1, 2), channels=1)
    ref = L.GaussianDiffusion(ref_unet, image_size=8, timesteps=100, objective=objective, beta_schedule="cosine",
                              **kw)
    ours = tiny(objective, beta_schedule="cosine", **kw)
    load_arrays_into(ours.model, {k: v.numpy() for k, v in ref_unet.state_dict().items()}, LUCIDRAINS_UNET_TO_MS)
    rng = np.random.default_rng(0)
    img = rng.random((4, 1, 8, 8)).astype(np.float32)
    noise = rng.standard_normal(img.shape).astype(np.float32)
    t = np.array([0, 7, 42, 99])
    with torch.no_grad():
        expected = ref(torch.tensor(img), times=torch.tensor(t), noise=torch.tensor(noise), loss_reduction="none")
    got = ours(Tensor(img), times=Tensor(t.astype(np.int32)), noise=Tensor(noise), self_cond=False,
               loss_reduction="none")
    np.testing.assert_allclose(got.asnumpy(), expected.numpy(), rtol=2e-5, atol=1e-7)


def _inject_torch_noise(monkeypatch, torch, x_T, step_noises):
    """Make lucidrains' torch.randn return x_T and torch.randn_like the given per-step draws."""
    draws = iter(step_noises)
    monkeypatch.setattr(torch, "randn", lambda *a, **k: torch.tensor(x_T))
    monkeypatch.setattr(torch, "randn_like", lambda x, **k: torch.tensor(next(draws)))


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_whole_sample_parity_with_lucidrains(sampler, monkeypatch):
    import torch

    from tests.anchors import lucidrains
    L = lucidrains()
    torch.manual_seed(1)
    T, steps = 20, (5 if sampler == "ddim" else 20)
    ref_unet = L.Unet(dim=8, dim_mults=(1, 2), channels=1)
    ref = L.GaussianDiffusion(ref_unet, image_size=8, timesteps=T, sampling_timesteps=steps, objective="pred_noise",
                              beta_schedule="cosine", ddim_sampling_eta=0.0)
    ours = GaussianDiffusion(Unet(dim=8, dim_mults=(1, 2), channels=1), image_size=8, timesteps=T,
                             sampling_timesteps=steps, objective="pred_noise", beta_schedule="cosine")
    load_arrays_into(ours.model, {k: v.numpy() for k, v in ref_unet.state_dict().items()}, LUCIDRAINS_UNET_TO_MS)

    rng = np.random.default_rng(3)
    x_T = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
    # our DDPM draws one normal per step with t > 0 from the same generator; replay those draws for torch
    replay = np.random.default_rng(7)
    step_noises = [replay.standard_normal(x_T.shape).astype(np.float32) for _ in range(T)]
    _inject_torch_noise(monkeypatch, torch, x_T, step_noises if sampler == "ddpm" else [x_T * 0] * steps)
    with torch.no_grad():
        expected = ref.sample(batch_size=2).numpy()
    got = ours.sample(batch_size=2, seed=np.random.default_rng(7), x_T=Tensor(x_T)).asnumpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=2e-5)


@pytest.mark.slow
def test_training_reduces_loss_in_graph_mode():
    d = tiny("pred_noise", beta_schedule="linear")
    d.set_train(True)
    opt = nn.Adam(d.trainable_params(), learning_rate=3e-3)
    rng = np.random.default_rng(0)
    img = Tensor(rng.random((8, 1, 8, 8)).astype(np.float32))
    inputs = d.training_inputs(img.asnumpy(), rng)
    t, noise = Tensor(inputs["times"]), Tensor(inputs["noise"])
    def loss_fn(x):
        return d(x, times=t, noise=noise, self_cond=False)

    grad_fn = ms.value_and_grad(loss_fn, None, opt.parameters)

    @ms.jit
    def step(x):
        loss, grads = grad_fn(x)
        opt(grads)
        return loss

    losses = [float(step(img).asnumpy()) for _ in range(25)]
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses


def test_ddim_eta0_is_deterministic_and_seeded_sampling_reproducible():
    d = tiny(sampling_timesteps=5)
    x_T = rand((2, 1, 8, 8), 5)
    a = d.sample(batch_size=2, x_T=x_T, seed=0).asnumpy()
    b = d.sample(batch_size=2, x_T=x_T, seed=123).asnumpy()  # eta = 0: the seed only draws x_T
    np.testing.assert_array_equal(a, b)
    c = d.sample(batch_size=2, seed=11, eta=1.0).asnumpy()
    e = d.sample(batch_size=2, seed=11, eta=1.0).asnumpy()
    f = d.sample(batch_size=2, seed=12, eta=1.0).asnumpy()
    np.testing.assert_array_equal(c, e)
    assert np.abs(c - f).max() > 1e-3
    assert a.min() >= 0.0 and a.max() <= 1.0 and a.shape == (2, 1, 8, 8)
    frames = d.sample(batch_size=2, seed=0, return_all_timesteps=True)
    assert frames.shape == (2, 6, 1, 8, 8)


def test_offset_noise_and_immiscible_inputs():
    d = tiny(offset_noise_strength=0.1, immiscible=True)
    rng = np.random.default_rng(0)
    img = rng.random((6, 1, 8, 8)).astype(np.float32)
    inputs = d.training_inputs(img, np.random.default_rng(1))
    # replay the draws: base noise, then per-(sample, channel) offsets, then the assignment
    r = np.random.default_rng(1)
    times = r.integers(0, 100, size=(6,))
    base = r.standard_normal(img.shape).astype(np.float32)
    offset = r.standard_normal((6, 1, 1, 1)).astype(np.float32)
    noise = base + 0.1 * offset
    perm = d.noise_assignment(img * 2 - 1, noise)
    np.testing.assert_array_equal(inputs["times"], times)
    np.testing.assert_allclose(inputs["noise"], noise[perm], rtol=1e-6)
    x = (img * 2 - 1).reshape(6, -1)
    dist = pairwise_distances(x, noise.reshape(6, -1))
    assert dist[np.arange(6), perm].sum() <= dist[np.arange(6), np.arange(6)].sum() + 1e-9
    loss = d(Tensor(img))  # in-graph draws + host assignment in PyNative
    assert np.isfinite(loss.asnumpy())


@pytest.mark.parametrize("kwargs", [
    dict(objective="pred_noise", learned_variance=True),
    dict(objective="pred_v", self_condition=True, loss_type="l1", original_elbo_weight=0.1, learn_logvar=True),
    dict(objective="pred_x0", num_classes=3, loss_type="huber", v_posterior=0.1, zero_terminal_snr=True),
])
@pytest.mark.slow
def test_option_paths_train_and_sample(kwargs):
    d = tiny(sampling_timesteps=4, **kwargs)
    d.set_train(True)
    img = Tensor(np.random.default_rng(0).random((2, 1, 8, 8)).astype(np.float32))
    classes = Tensor(np.array([0, 2], np.int32)) if kwargs.get("num_classes") else None
    loss = d(img, classes=classes)
    assert loss.shape == () and np.isfinite(loss.asnumpy())
    grads = ms.grad(lambda x: d(x, classes=classes, self_cond=True), grad_position=None,
                    weights=d.trainable_params())(img)
    assert all(np.isfinite(g.asnumpy()).all() for g in grads)
    d.set_train(False)
    sample = d.sample(batch_size=2, seed=0, classes=[1, 2] if classes is not None else None,
                      guidance_scale=2.0 if classes is not None else 1.0)
    assert sample.shape == (2, 1, 8, 8) and np.isfinite(sample.asnumpy()).all()
    if kwargs.get("learned_variance"):
        ddpm = d.sample(batch_size=2, seed=0, sampler="ddpm")
        assert np.isfinite(ddpm.asnumpy()).all()


# ----------------------------------------------------------------------------- the loss options, numerically
#
# Every expected value below is written out here in numpy float64 from the papers (DDPM: Ho et al. 2020;
# improved DDPM: Nichol & Dhariwal 2021) and ldm's ``DDPM.p_losses`` / ``LatentDiffusion.p_losses``, applied to
# the network's own raw output, so only the loss math is under test. The schedule is given as explicit betas.

T_LOSS = 50
BETAS = np.linspace(1e-3, 0.12, T_LOSS)                       # float64; abar_{T-1} ~ 0.04
TIMES = np.array([0, 1, 9, 30, 49, 30])                       # t = 0 special cases; 30 twice (logvar gradient)


def _ref_schedule(v_posterior=0.0):
    """DDPM eqs. (6)-(7) with ldm's v_posterior mix of the posterior variance: sigma^2 = (1-v) beta~ + v beta."""
    b = BETAS
    alphas = 1.0 - b
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    beta_tilde = b * (1.0 - abar_prev) / (1.0 - abar)
    return dict(betas=b, alphas=alphas, abar=abar, snr=abar / (1.0 - abar),
                sigma2=(1.0 - v_posterior) * beta_tilde + v_posterior * b,
                coef1=b * np.sqrt(abar_prev) / (1.0 - abar), coef2=(1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar))


def _col(a, t):
    return a[t].reshape(-1, 1, 1, 1)


def _loss_diffusion(objective="pred_noise", learned_variance=False, **kwargs):
    net = Unet(dim=8, dim_mults=(1, 2), channels=1, learned_variance=learned_variance)
    return GaussianDiffusion(net, image_size=8, betas=BETAS, objective=objective, **kwargs)


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    img = rng.random((len(TIMES), 1, 8, 8)).astype(np.float32)
    return img, rng.standard_normal(img.shape).astype(np.float32)


def _raw(d, img, noise, s):
    """(x0, x_t, eps, raw network output) in float64; the network is run once on x_t."""
    x0 = img.astype(np.float64) * 2.0 - 1.0
    eps = noise.astype(np.float64)
    xt = np.sqrt(_col(s["abar"], TIMES)) * x0 + np.sqrt(1.0 - _col(s["abar"], TIMES)) * eps
    out = d.model(Tensor(xt.astype(np.float32)), Tensor(TIMES.astype(np.int32))).asnumpy().astype(np.float64)
    return x0, xt, eps, out


def _ours(d, img, noise, reduction="none"):
    return d(Tensor(img), times=Tensor(TIMES.astype(np.int32)), noise=Tensor(noise), self_cond=False,
             loss_reduction=reduction)


def _target_and_x0_hat(objective, s, x0, xt, eps, pred):
    """The regression target of ``objective`` and the x0 the prediction implies (DDPM eq. 4; v of Salimans & Ho)."""
    a, sg = np.sqrt(_col(s["abar"], TIMES)), np.sqrt(1.0 - _col(s["abar"], TIMES))
    if objective == "pred_noise":
        return eps, (xt - sg * pred) / a
    if objective == "pred_x0":
        return x0, pred
    return a * eps - sg * x0, a * xt - sg * pred


def _simple_weight(objective, s):
    """lucidrains' per-timestep weight making every objective the eps-MSE: 1, SNR, SNR / (SNR + 1)."""
    return {"pred_noise": np.ones_like(s["snr"]), "pred_x0": s["snr"], "pred_v": s["snr"] / (s["snr"] + 1.0)}[objective]


def _mean_flat(x):
    return x.reshape(x.shape[0], -1).mean(axis=1)


@pytest.mark.parametrize("objective,loss_type", [("pred_noise", "l1"), ("pred_noise", "huber"), ("pred_v", "huber"),
                                                 ("pred_x0", "l1")])
def test_l1_and_huber_losses_and_l_simple_weight_match_their_formulas(objective, loss_type):
    d = _loss_diffusion(objective, loss_type=loss_type, l_simple_weight=0.7)
    s = _ref_schedule()
    img, noise = _batch(1)
    x0, xt, eps, out = _raw(d, img, noise, s)
    target, _ = _target_and_x0_hat(objective, s, x0, xt, eps, out)
    diff = out - target
    if loss_type == "l1":
        elementwise = np.abs(diff)
    else:   # Huber / smooth L1 with delta 1: 0.5 d^2 inside |d| < 1, |d| - 0.5 outside
        elementwise = np.where(np.abs(diff) < 1.0, 0.5 * diff ** 2, np.abs(diff) - 0.5)
        if objective == "pred_noise":
            inside = (np.abs(diff) < 1.0).mean()
            assert 0.2 < inside < 0.95, inside       # both branches are exercised
    want = 0.7 * _simple_weight(objective, s)[TIMES] * _mean_flat(elementwise)
    got = _ours(d, img, noise).asnumpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(float(_ours(d, img, noise, "mean").asnumpy()), want.mean(), rtol=1e-5)


@pytest.mark.parametrize("objective,v_posterior", [("pred_noise", 0.0), ("pred_x0", 0.0), ("pred_v", 0.0),
                                                   ("pred_x0", 0.3), ("pred_noise", 0.3)])
def test_original_elbo_term_is_the_exact_posterior_kl(objective, v_posterior):
    """loss = l_simple_weight * simple + original_elbo_weight * L_{t-1}, with L_{t-1} the KL between the true
    posterior and the model's (same variance sigma_t^2): |mu~(x0, x_t) - mu~(x0_hat, x_t)|^2 / (2 sigma_t^2) per
    element (DDPM eq. 8 without its constant), i.e. lvlb_weight * MSE. This is the exact formula: ldm's x0 weight
    ``0.5 * sqrt(abar) / (2. * 1 - abar)`` has an operator-precedence bug and ldm uses ones for v, so ldm's
    numbers differ for pred_x0 / pred_v (asserted below for pred_x0). At t = 0, where sigma_0 = 0 (v = 0), the
    t = 1 weight is used, as ldm does."""
    d = _loss_diffusion(objective, l_simple_weight=0.5, original_elbo_weight=0.3, v_posterior=v_posterior)
    s = _ref_schedule(v_posterior)
    img, noise = _batch(2)
    x0, xt, eps, out = _raw(d, img, noise, s)
    target, x0_hat = _target_and_x0_hat(objective, s, x0, xt, eps, out)
    mse = _mean_flat((out - target) ** 2)
    c1, c2 = _col(s["coef1"], TIMES), _col(s["coef2"], TIMES)
    with np.errstate(divide="ignore"):   # sigma_0 = 0 when v = 0
        kl = _mean_flat(((c1 * x0 + c2 * xt) - (c1 * x0_hat + c2 * xt)) ** 2) / (2.0 * s["sigma2"][TIMES])
    # t = 0: ldm's lvlb_weights[0] = lvlb_weights[1], the t = 1 weight of the MSE
    ab1, s1 = s["abar"][1], s["sigma2"][1]
    first = {"pred_noise": s["betas"][1] ** 2 / (2 * s1 * s["alphas"][1] * (1 - ab1)),
             "pred_x0": s["coef1"][1] ** 2 / (2 * s1), "pred_v": s["coef1"][1] ** 2 * (1 - ab1) / (2 * s1)}[objective]
    elbo = np.where(TIMES == 0, first * mse, kl)
    want = 0.5 * _simple_weight(objective, s)[TIMES] * mse + 0.3 * elbo
    got = _ours(d, img, noise).asnumpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)
    assert (np.abs(0.3 * elbo) > 1e-3 * np.abs(want)).all()   # per row, the ELBO term is well above the tolerance
    if objective == "pred_x0" and v_posterior == 0.0:
        ab = s["abar"][TIMES]
        ldm_weight = 0.5 * np.sqrt(ab) / (2.0 * 1 - ab)
        ldm_weight[TIMES == 0] = 0.5 * np.sqrt(s["abar"][1]) / (2.0 * 1 - s["abar"][1])
        ldm = 0.5 * _simple_weight(objective, s)[TIMES] * mse + 0.3 * ldm_weight * mse
        assert np.abs(got - ldm).max() > 1e-2 * np.abs(ldm).max()   # we do not reproduce ldm's bug


def test_v_posterior_mixes_the_sampling_variance():
    """ldm's v_posterior: sigma_t^2 = (1 - v) beta~_t + v beta_t, in q_posterior, p_mean_variance and a DDPM step."""
    v = 0.3
    d = _loss_diffusion("pred_noise", v_posterior=v)
    s = _ref_schedule(v)
    img, noise = _batch(3)
    x0, xt, eps, out = _raw(d, img, noise, s)
    t = Tensor(TIMES.astype(np.int32))
    _, var, log_var = d.q_posterior(Tensor(x0.astype(np.float32)), Tensor(xt.astype(np.float32)), t)
    np.testing.assert_allclose(var.asnumpy()[:, 0, 0, 0], s["sigma2"][TIMES], rtol=1e-6)
    np.testing.assert_allclose(log_var.asnumpy()[:, 0, 0, 0], np.log(s["sigma2"][TIMES]), rtol=1e-6)
    mean, var2, _, x0_clipped = d.p_mean_variance(Tensor(xt.astype(np.float32)), t)
    np.testing.assert_allclose(var2.asnumpy()[:, 0, 0, 0], s["sigma2"][TIMES], rtol=1e-6)
    x0_hat = np.clip((xt - np.sqrt(1 - _col(s["abar"], TIMES)) * out) / np.sqrt(_col(s["abar"], TIMES)), -1, 1)
    np.testing.assert_allclose(x0_clipped.asnumpy(), x0_hat, rtol=1e-5, atol=1e-5)
    mean_want = _col(s["coef1"], TIMES) * x0_hat + _col(s["coef2"], TIMES) * xt
    np.testing.assert_allclose(mean.asnumpy(), mean_want, rtol=1e-5, atol=1e-5)
    # one ancestral step t -> t-1 from x_t: mean + sigma_t z, z the sampler's next draw from its generator
    k = 3                                                     # a batch of B copies of the t = 30 row
    x = np.repeat(xt[k:k + 1], 2, axis=0)
    res = d.sample_with_trajectory(2, seed=np.random.default_rng(5), sampler="ddpm", x_T=Tensor(x.astype(np.float32)),
                                   timesteps=[int(TIMES[k]), int(TIMES[k]) - 1], log_every_t=1)
    z = np.random.default_rng(5).standard_normal(x.shape).astype(np.float32).astype(np.float64)
    step = mean_want[k:k + 1] + np.sqrt(s["sigma2"][TIMES[k]]) * z
    np.testing.assert_allclose(res.trajectory.xs[1], step, rtol=1e-5, atol=2e-5)


def test_learned_logvar_loss_and_its_gradient():
    """ldm: loss = l_simple_weight * mean(simple / exp(logvar_t) + logvar_t) + original_elbo_weight * mean(lvlb)."""
    d = _loss_diffusion("pred_noise", learn_logvar=True, l_simple_weight=0.5, original_elbo_weight=0.1)
    assert any(p is d.logvar for p in d.trainable_params())
    s = _ref_schedule()
    logvar = np.random.default_rng(4).uniform(-1.0, 1.0, T_LOSS)
    d.logvar.set_data(Tensor(logvar.astype(np.float32)))
    img, noise = _batch(4)
    x0, xt, eps, out = _raw(d, img, noise, s)
    mse = _mean_flat((out - eps) ** 2)
    lv = logvar.astype(np.float32).astype(np.float64)[TIMES]
    with np.errstate(divide="ignore"):
        lvlb = s["betas"] ** 2 / (2 * s["sigma2"] * s["alphas"] * (1 - s["abar"]))
    lvlb[0] = lvlb[1]
    want = 0.5 * (mse / np.exp(lv) + lv) + 0.1 * lvlb[TIMES] * mse
    np.testing.assert_allclose(_ours(d, img, noise).asnumpy(), want, rtol=1e-5, atol=1e-8)
    # d loss / d logvar_k = l_simple_weight / B * sum_{i: t_i = k} (1 - simple_i exp(-logvar_k))
    grad = ms.grad(lambda x: _ours(d, x, noise, "mean"), grad_position=None, weights=[d.logvar])(Tensor(img))[0]
    want_grad = np.zeros(T_LOSS)
    np.add.at(want_grad, TIMES, 0.5 / len(TIMES) * (1.0 - mse * np.exp(-lv)))
    np.testing.assert_allclose(grad.asnumpy(), want_grad, rtol=1e-5, atol=1e-7)
    assert np.count_nonzero(grad.asnumpy()) == len(set(TIMES.tolist()))


def _approx_cdf(x):
    return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def _ref_vb(s, t, x0, xt, x0_hat, var_out):
    """improved DDPM (Nichol & Dhariwal 2021, eqs. 4-5, 15): KL(q(x_{t-1}|x_t,x0) || N(mu~(x0_hat), Sigma)) in bits
    per dim for t > 0 and the discretized-Gaussian decoder NLL for t = 0 (their tanh-approximated CDF, bins of
    2/255, edge bins open), with log Sigma = f log beta_t + (1 - f) log beta~_t, f = (out + 1) / 2 and log beta~
    clipped at 1e-20 as lucidrains and ldm do (improved-diffusion itself uses beta~_1 at t = 0)."""
    c1, c2 = _col(s["coef1"], t), _col(s["coef2"], t)
    true_mean, true_logvar = c1 * x0 + c2 * xt, np.log(np.maximum(_col(s["sigma2"], t), 1e-20))
    model_mean = c1 * x0_hat + c2 * xt
    frac = (var_out + 1.0) / 2.0
    model_logvar = frac * np.log(_col(s["betas"], t)) + (1.0 - frac) * true_logvar
    kl = 0.5 * (-1.0 + model_logvar - true_logvar + np.exp(true_logvar - model_logvar)
                + (true_mean - model_mean) ** 2 * np.exp(-model_logvar))
    inv_std = np.exp(-0.5 * model_logvar)
    centered = x0 - model_mean
    cdf_plus, cdf_min = _approx_cdf(inv_std * (centered + 1 / 255)), _approx_cdf(inv_std * (centered - 1 / 255))
    log_probs = np.where(x0 < -0.999, np.log(np.maximum(cdf_plus, 1e-15)),
                         np.where(x0 > 0.999, np.log(np.maximum(1 - cdf_min, 1e-15)),
                                  np.log(np.maximum(cdf_plus - cdf_min, 1e-15))))
    return np.where(t == 0, -_mean_flat(log_probs), _mean_flat(kl)) / np.log(2.0)


@pytest.mark.parametrize("objective", ["pred_noise", "pred_v"])
def test_learned_variance_hybrid_loss_matches_improved_ddpm(objective):
    d = _loss_diffusion(objective, learned_variance=True, vb_loss_weight=1.0)
    s = _ref_schedule()
    img, noise = _batch(5)
    img[0, 0, 0, :3] = [0.0, 1.0, 0.5]                       # t = 0 row: both open edge bins and an inner one
    x0, xt, eps, out = _raw(d, img, noise, s)
    pred, var_out = out[:, :1], out[:, 1:]
    target, x0_hat = _target_and_x0_hat(objective, s, x0, xt, eps, pred)
    simple = _simple_weight(objective, s)[TIMES] * _mean_flat((pred - target) ** 2)
    vb = _ref_vb(s, TIMES, x0, xt, x0_hat, var_out)
    got = _ours(d, img, noise).asnumpy()
    np.testing.assert_allclose(got, simple + vb, rtol=1e-5, atol=1e-7)
    assert (vb > 1e-3 * (simple + vb)).all()   # per row, the vb term is well above the tolerance


class _FixedOutput(nn.Cell):
    """A 'network' whose output is a parameter: its gradient is d loss / d model output."""

    def __init__(self, out):
        super().__init__()
        self.channels, self.out_dim, self.self_condition = 1, 2, False
        self.out = ms.Parameter(Tensor(out.astype(np.float32)), name="out")

    def construct(self, x, t, x_self_cond=None, classes=None):
        return self.out + 0.0 * x.sum()


def test_learned_variance_vb_term_stops_the_gradient_of_the_mean():
    """improved DDPM: L_hybrid = L_simple + lambda L_vlb with a stop-gradient on the mean in L_vlb, so the mean
    channels get the simple loss's gradient only and the variance channels L_vlb's."""
    s = _ref_schedule()
    img, noise = _batch(6)
    out = np.random.default_rng(7).uniform(-0.9, 0.9, (len(TIMES), 2, 8, 8))
    d = GaussianDiffusion(_FixedOutput(out), image_size=8, betas=BETAS, objective="pred_noise", vb_loss_weight=1.0)
    out = out.astype(np.float32).astype(np.float64)
    grad = ms.grad(lambda x: _ours(d, x, noise, "mean"), grad_position=None, weights=[d.model.out])(Tensor(img))[0]
    grad = grad.asnumpy()
    n, b = 64, len(TIMES)
    x0 = img.astype(np.float64) * 2 - 1
    eps = noise.astype(np.float64)
    xt = np.sqrt(_col(s["abar"], TIMES)) * x0 + np.sqrt(1 - _col(s["abar"], TIMES)) * eps
    np.testing.assert_allclose(grad[:, :1], 2.0 * (out[:, :1] - eps) / (n * b), rtol=1e-5, atol=1e-9)

    # variance channels, t > 0: d KL / d log Sigma = (1 - exp(log beta~ - log Sigma) - (mu - mu_hat)^2 / Sigma) / 2
    # and d log Sigma / d out = (log beta_t - log beta~_t) / 2; the loss is their mean / ln 2
    _, x0_hat = _target_and_x0_hat("pred_noise", s, x0, xt, eps, out[:, :1])
    c1 = _col(s["coef1"], TIMES)
    log_beta, log_tilde = np.log(_col(s["betas"], TIMES)), np.log(np.maximum(_col(s["sigma2"], TIMES), 1e-20))
    model_logvar = (out[:, 1:] + 1) / 2 * log_beta + (1 - (out[:, 1:] + 1) / 2) * log_tilde
    dkl = 0.5 * (1 - np.exp(log_tilde - model_logvar) - (c1 * (x0 - x0_hat)) ** 2 * np.exp(-model_logvar))
    want = dkl * 0.5 * (log_beta - log_tilde) / (n * b * np.log(2.0))
    rows = TIMES > 0
    np.testing.assert_allclose(grad[rows, 1:], want[rows], rtol=1e-4, atol=1e-6 * np.abs(want[rows]).max())
    # t = 0 (decoder NLL): a central difference of the row's term in float64
    h, (y, x) = 1e-6, (2, 3)
    terms = []
    for sign in (1, -1):
        var_out = out[:1, 1:].copy()
        var_out[0, 0, y, x] += sign * h
        terms.append(_ref_vb(s, TIMES[:1], x0[:1], xt[:1], x0_hat[:1], var_out)[0])
    np.testing.assert_allclose(grad[0, 1, y, x], (terms[0] - terms[1]) / (2 * h) / b, rtol=1e-4)


@pytest.mark.torch
def test_learned_variance_loss_parity_with_lucidrains():
    import importlib.util
    import sys
    from pathlib import Path

    import torch

    from tests.anchors import lucidrains
    L = lucidrains()
    name = "denoising_diffusion_pytorch.learned_gaussian_diffusion"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(L.__file__).parent / "learned_gaussian_diffusion.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    torch.manual_seed(0)
    ref_unet = L.Unet(dim=8, dim_mults=(1, 2), channels=1, learned_variance=True)
    ref = sys.modules[name].LearnedGaussianDiffusion(ref_unet, vb_loss_weight=0.5, image_size=8, timesteps=100,
                                                     objective="pred_noise", beta_schedule="cosine")
    ours = tiny("pred_noise", learned_variance=True, beta_schedule="cosine", vb_loss_weight=0.5)
    load_arrays_into(ours.model, {k: v.numpy() for k, v in ref_unet.state_dict().items()}, LUCIDRAINS_UNET_TO_MS)
    rng = np.random.default_rng(0)
    img = rng.random((5, 1, 8, 8)).astype(np.float32)
    img[0, 0, 0, :2] = [0.0, 1.0]
    noise = rng.standard_normal(img.shape).astype(np.float32)
    t = np.array([0, 1, 7, 42, 99])
    with torch.no_grad():
        expected = ref(torch.tensor(img), times=torch.tensor(t), noise=torch.tensor(noise), loss_reduction="none")
    got = ours(Tensor(img), times=Tensor(t.astype(np.int32)), noise=Tensor(noise), self_cond=False,
               loss_reduction="none")
    np.testing.assert_allclose(got.asnumpy(), expected.numpy(), rtol=2e-5, atol=1e-6)
    ours.vb_loss_weight = 0.0   # the vb part is far above the tolerance in every row
    without_vb = ours(Tensor(img), times=Tensor(t.astype(np.int32)), noise=Tensor(noise), self_cond=False,
                      loss_reduction="none").asnumpy()
    assert (np.abs(expected.numpy() - without_vb) > 1e-3 * np.abs(expected.numpy())).all()


def test_interpolate():
    d = tiny(T=10)
    out = d.interpolate(rand((2, 1, 8, 8), 1), rand((2, 1, 8, 8), 2), t=5, seed=0)
    assert out.shape == (2, 1, 8, 8) and np.isfinite(out.asnumpy()).all()


def test_bad_inputs_are_clear_errors():
    d = tiny()
    with pytest.raises(ValueError, match="images are 16x16 but the diffusion was built for 8x8"):
        d(Tensor(np.zeros((1, 1, 16, 16), np.float32)))
    with pytest.raises(ValueError, match="3 channel"):
        d(Tensor(np.zeros((1, 3, 8, 8), np.float32)))
    with pytest.raises(ValueError, match="unknown beta schedule"):
        tiny(beta_schedule="cosin")
    with pytest.raises(ValueError, match="unknown objective"):
        tiny(objective="eps")
    with pytest.raises(ValueError, match="sampling_timesteps"):
        tiny(sampling_timesteps=500)
    with pytest.raises(ValueError, match="not divisible by 2"):
        GaussianDiffusion(Unet(dim=8, dim_mults=(1, 2), channels=1), image_size=7)
    with pytest.raises(ValueError, match="pred_v"):
        tiny("pred_noise", zero_terminal_snr=True)
    with pytest.raises(ValueError, match="unknown sampler"):
        d.sample(batch_size=1, sampler="lms")
    with pytest.raises(ValueError, match="needs a conditional model"):
        d.sample(batch_size=1, guidance_scale=3.0)
