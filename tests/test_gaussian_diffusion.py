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
@pytest.mark.parametrize("objective,kw", [("pred_noise", {}), ("pred_x0", dict(min_snr_loss_weight=True)),
                                          ("pred_v", dict(min_snr_loss_weight=True, min_snr_gamma=3))])
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
        d.sample(batch_size=1, sampler="euler_a")
    with pytest.raises(ValueError, match="needs a class-conditional"):
        d.sample(batch_size=1, guidance_scale=3.0)
