"""Classifier-free guidance: the batched (conditional + null-class) forward equals two separate passes
combined by diffusers' guidance (uncond + s (cond - uncond), ``rescale_noise_cfg``), the rescale's
properties, learned variance and self-conditioning under guidance, and errors."""
from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from ms_diffusion import GaussianDiffusion, Unet

NUM_CLASSES = 3
T = 100
_CACHE = {}


def conditional(objective: str = "pred_v", **unet_kwargs) -> GaussianDiffusion:
    key = (objective, tuple(sorted(unet_kwargs.items())))
    if key not in _CACHE:
        ms.set_seed(0)
        np.random.seed(0)
        net = Unet(dim=8, dim_mults=(1, 2), channels=1, num_classes=NUM_CLASSES, **unet_kwargs)
        _CACHE[key] = GaussianDiffusion(net, image_size=8, timesteps=T, objective=objective,
                                        beta_schedule="cosine")
    return _CACHE[key]


def diffusers_guidance(cond: np.ndarray, uncond: np.ndarray, scale: float, rescale: float) -> np.ndarray:
    """The anchor: diffusers' classifier-free guidance on float64 torch tensors.

    ``ClassifierFreeGuidance.forward`` computes uncond + s (cond - uncond) (its default, the formula of
    the Stable Diffusion pipelines) and then ``rescale_noise_cfg`` (Lin et al. 2023, sec. 3.4) with
    ``guidance_rescale``; both are diffusers' code (diffusers/guiders/).
    """
    torch = pytest.importorskip("torch")
    guiders = pytest.importorskip("diffusers.guiders")
    guider = guiders.ClassifierFreeGuidance(guidance_scale=scale, guidance_rescale=rescale)
    out = guider.forward(pred_cond=torch.from_numpy(np.asarray(cond, np.float64)),
                         pred_uncond=torch.from_numpy(np.asarray(uncond, np.float64)))
    return out.pred.numpy()


def numpy_eps_x0(d: GaussianDiffusion, x: np.ndarray, t: int, out: np.ndarray):
    a, s = np.sqrt(d.schedule.alphas_cumprod[t]), np.sqrt(1 - d.schedule.alphas_cumprod[t])
    if d.objective == "pred_noise":
        return out, (x - s * out) / a
    x0 = a * x - s * out  # pred_v
    return a * out + s * x, x0


def separate_passes(d: GaussianDiffusion, x: np.ndarray, t: int, classes, x_self_cond=None):
    """The model run twice (PyNative, batch B each): with the classes, and with the null class."""
    b = x.shape[0]
    tt = Tensor(np.full((b,), t, np.int32))
    sc = None if x_self_cond is None else Tensor(x_self_cond)
    cond = d.model(Tensor(x), tt, sc, Tensor(np.asarray(classes, np.int32))).asnumpy().astype(np.float64)
    uncond = d.model(Tensor(x), tt, sc, Tensor(np.full((b,), NUM_CLASSES, np.int32))).asnumpy().astype(np.float64)
    return cond, uncond


def assert_close(got: Tensor, want: np.ndarray, rtol: float = 2e-5) -> None:
    err = np.abs(got.asnumpy() - want).max() / np.abs(want).max()
    assert err < rtol, err


@pytest.mark.parametrize("objective,self_condition", [("pred_v", False), ("pred_noise", True)])
def test_batched_guidance_equals_two_separate_passes(objective, self_condition):
    d = conditional(objective, self_condition=self_condition)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
    sc = rng.uniform(-1, 1, x.shape).astype(np.float32) if self_condition else None
    classes, t = [0, 2], 37
    cond, uncond = separate_passes(d, x, t, classes, sc)
    assert np.abs(cond - uncond).max() > 1e-3  # the class embedding matters
    # several scales / rescales through one compiled graph each: the weights are tensor inputs
    for scale, rescale in ((3.0, 0.0), (7.5, 0.0), (3.0, 0.7), (5.0, 0.3)):
        denoise = d.denoiser(2, classes, guidance_scale=scale, guidance_rescale=rescale, clip_denoised=False)
        eps, x0 = denoise(Tensor(x), t, None if sc is None else Tensor(sc))
        want_eps, want_x0 = numpy_eps_x0(d, x.astype(np.float64), t, diffusers_guidance(cond, uncond, scale, rescale))
        assert_close(eps, want_eps)
        assert_close(x0, want_x0)


def test_diffusers_anchor_is_the_cfg_formula_and_rescale_noise_cfg():
    """The anchor function above is what the diffusers pipelines do inline (pipeline_stable_diffusion.py)."""
    torch = pytest.importorskip("torch")
    rescale_noise_cfg = pytest.importorskip("diffusers.guiders.guider_utils").rescale_noise_cfg
    rng = np.random.default_rng(1)
    cond, uncond = rng.normal(0, 1.0, (2, 1, 8, 8)), rng.normal(0, 0.8, (2, 1, 8, 8))
    plain = torch.from_numpy(uncond) + 7.0 * (torch.from_numpy(cond) - torch.from_numpy(uncond))
    np.testing.assert_allclose(diffusers_guidance(cond, uncond, 7.0, 0.0), plain.numpy(), rtol=1e-12)
    want = rescale_noise_cfg(plain, torch.from_numpy(cond), guidance_rescale=0.6).numpy()
    np.testing.assert_allclose(diffusers_guidance(cond, uncond, 7.0, 0.6), want, rtol=1e-12)


def test_guidance_rescale_pulls_the_std_towards_the_conditional_one():
    """The library's guided eps (pred_noise: eps is the guided network output) against diffusers, and
    the rescale's defining properties on the library's own output (Lin et al. 2023, sec. 3.4)."""
    d = conditional("pred_noise")
    x = np.random.default_rng(1).standard_normal((2, 1, 8, 8)).astype(np.float32)
    classes, t = [2, 1], 80
    cond, uncond = separate_passes(d, x, t, classes)

    def guided(rescale: float) -> np.ndarray:
        eps, _ = d.denoiser(2, classes, guidance_scale=7.0, guidance_rescale=rescale, clip_denoised=False)(Tensor(x), t)
        return eps.asnumpy().astype(np.float64)

    plain, full, half = guided(0.0), guided(1.0), guided(0.5)
    for got, rescale in ((plain, 0.0), (full, 1.0), (half, 0.5)):
        assert_close(Tensor(got.astype(np.float32)), diffusers_guidance(cond, uncond, 7.0, rescale))
    axes = (1, 2, 3)
    assert (plain.std(axis=axes) / cond.std(axis=axes)).min() > 1.1   # guidance inflates the std (1.2x, 1.5x) ...
    np.testing.assert_allclose(full.std(axis=axes), cond.std(axis=axes), rtol=2e-5)  # ... rescale 1 undoes it
    np.testing.assert_allclose(half, 0.5 * full + 0.5 * plain, rtol=0, atol=2e-5 * np.abs(full).max())


def test_learned_variance_comes_from_the_conditional_pass():
    d = conditional("pred_noise", learned_variance=True)
    x = np.random.default_rng(2).standard_normal((2, 1, 8, 8)).astype(np.float32)
    classes, t = [1, 0], 60
    cond, uncond = separate_passes(d, x, t, classes)
    eps, x0, log_var = d.denoiser(2, classes, guidance_scale=4.0, clip_denoised=False)(Tensor(x), t)
    want_eps, want_x0 = numpy_eps_x0(d, x.astype(np.float64), t, diffusers_guidance(cond[:, :1], uncond[:, :1], 4.0, 0.0))
    assert_close(eps, want_eps)
    assert_close(x0, want_x0)
    frac = (cond[:, 1:] + 1) / 2  # improved-DDPM interpolation between the posterior's and beta's log-variance
    s = d.schedule
    want = frac * np.log(s.betas[t]) + (1 - frac) * s.posterior_log_variance_clipped[t]
    assert_close(log_var, want)


@pytest.mark.slow
def test_scale_zero_is_unconditional_and_scale_one_is_conditional():
    d = conditional("pred_v")
    kwargs = dict(sampler="dpmpp", steps=4, seed=3)
    uncond = d.sample(2, **kwargs).asnumpy()                       # classes None: the null class
    scale0 = d.sample(2, classes=[0, 1], guidance_scale=0.0, **kwargs).asnumpy()
    np.testing.assert_allclose(scale0, uncond, atol=2e-5)
    cond = d.sample(2, classes=[0, 1], **kwargs).asnumpy()         # one pass, no null class
    scale1 = d.sample(2, classes=[0, 1], guidance_scale=1.0 + 1e-7, **kwargs).asnumpy()  # the batched path
    np.testing.assert_allclose(scale1, cond, atol=2e-5)
    guided = d.sample(2, classes=[0, 1], guidance_scale=4.0, guidance_rescale=0.7, **kwargs).asnumpy()
    assert np.isfinite(guided).all() and np.abs(guided - cond).max() > 1e-3


def test_guidance_errors():
    d = conditional("pred_v")
    unconditional = GaussianDiffusion(Unet(dim=8, dim_mults=(1, 2), channels=1), image_size=8, timesteps=T)
    with pytest.raises(ValueError, match="needs a conditional model and something to guide towards"):
        unconditional.denoiser(2, [0, 1], guidance_scale=3.0)
    with pytest.raises(ValueError, match="needs a conditional model and something to guide towards"):
        d.denoiser(2, None, guidance_scale=3.0)
    with pytest.raises(ValueError, match="uncond is for tensor conditionings"):
        d.denoiser(2, [0, 1], guidance_scale=3.0, uncond=[1, 0])
    with pytest.raises(ValueError, match=r"classes must have shape \(2,\)"):
        d.denoiser(2, [0, 1, 2], guidance_scale=3.0)
    with pytest.raises(ValueError, match=r"classes must lie in \[0, 2\]"):
        d.denoiser(2, [0, 4], guidance_scale=3.0)
    with pytest.raises(ValueError, match="guidance_rescale must lie in"):
        d.denoiser(2, [0, 1], guidance_scale=3.0, guidance_rescale=1.5)
