"""The parts GaussianDiffusion is built from, each against an independent numpy formula: the eps / x0 / v
parameterisation, classifier-free guidance and its rescale, loss terms, label dropout, the network
contract, the default sampling plan, and ``training_loss`` == the positional ``construct`` call in a
compiled train step."""
from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn, ops

from ms_diffusion import GaussianDiffusion, Unet
from ms_diffusion.diffusion.gaussian_terms import elementwise_loss, normal_kl
from ms_diffusion.diffusion.guidance import check_guidance, guidance_batch, guide, stack_halves
from ms_diffusion.diffusion.parameterization import OBJECTIVES, diffuse, output_to_eps_x0, training_target
from ms_diffusion.diffusion.training_inputs import drop_labels
from ms_diffusion.models import DenoiserNetwork, check_denoiser_network
from ms_diffusion.training.step import TrainStep

SHAPE = (5, 2, 4, 4)


def _np(x) -> np.ndarray:
    return x.asnumpy().astype(np.float64)


def _levels(alphas):
    a = np.asarray(alphas, np.float64).reshape(-1, 1, 1, 1)
    return a, np.sqrt(1.0 - a * a)


def _t(a) -> Tensor:
    return Tensor(np.asarray(a, np.float32))


# ----------------------------------------------------------------------------- parameterisation

@pytest.mark.parametrize("objective", OBJECTIVES)
def test_targets_and_conversions_round_trip(objective):
    rng = np.random.default_rng(0)
    x0, eps = rng.uniform(-1, 1, SHAPE), rng.standard_normal(SHAPE)
    # pred_noise divides by alpha, pred_x0 by sigma: interior levels; v never divides (alpha = 0 and 1 too)
    a, s = _levels([0.0, 0.3, 0.7, 0.95, 1.0] if objective == "pred_v" else [0.05, 0.3, 0.7, 0.95, 0.99])
    x = a * x0 + s * eps
    want_target = {"pred_noise": eps, "pred_x0": x0, "pred_v": a * eps - s * x0}[objective]
    np.testing.assert_allclose(_np(diffuse(_t(x0), _t(eps), _t(a), _t(s))), x, rtol=1e-6, atol=1e-6)
    target = training_target(objective, _t(x0), _t(eps), _t(a), _t(s))
    np.testing.assert_allclose(_np(target), want_target, rtol=1e-6, atol=1e-6)
    got_eps, got_x0 = output_to_eps_x0(objective, _t(x), target, _t(a), _t(s))
    tol = 1e-4 if objective == "pred_v" else 2e-3   # 1 / 0.05 and 1 / sqrt(1 - 0.99^2) amplify float32 rounding
    np.testing.assert_allclose(_np(got_x0), x0, atol=tol)
    np.testing.assert_allclose(_np(got_eps), eps, atol=tol)
    assert np.isfinite(_np(got_eps)).all() and np.isfinite(_np(got_x0)).all()


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_static_clipping_rederives_eps(objective):
    rng = np.random.default_rng(1)
    a, s = _levels([0.2, 0.5, 0.8, 0.9, 0.6])
    x = rng.standard_normal(SHAPE) * 2.0
    out = rng.standard_normal(SHAPE) * 2.0
    x0 = {"pred_noise": (x - s * out) / a, "pred_x0": out, "pred_v": a * x - s * out}[objective]
    x0 = np.clip(x0, -1.0, 1.0)
    got_eps, got_x0 = output_to_eps_x0(objective, _t(x), _t(out), _t(a), _t(s), "static", rederive_pred_noise=True)
    np.testing.assert_allclose(_np(got_x0), x0, atol=1e-5)
    np.testing.assert_allclose(_np(got_eps), (x - a * x0) / s, rtol=1e-4, atol=1e-4)
    if objective == "pred_noise":   # without rederive, a noise prediction is returned as predicted
        eps, _ = output_to_eps_x0(objective, _t(x), _t(out), _t(a), _t(s), "static")
        np.testing.assert_array_equal(eps.asnumpy(), _t(out).asnumpy())


# ----------------------------------------------------------------------------- guidance

@pytest.mark.parametrize("scale,phi", [(3.0, 0.0), (7.5, 0.7), (1.5, 1.0)])
def test_guidance_combine_and_rescale_match_the_formula(scale, phi):
    rng = np.random.default_rng(2)
    cond, uncond = rng.standard_normal(SHAPE), rng.standard_normal(SHAPE) * 0.5
    guided = uncond + scale * (cond - uncond)
    if phi > 0:   # Lin et al. 2023 eq. 15-16 / diffusers rescale_noise_cfg (torch std: ddof 1; it cancels)
        std = lambda v: v.reshape(len(v), -1).std(axis=1, ddof=1).reshape(-1, 1, 1, 1)  # noqa: E731
        guided = phi * guided * std(cond) / std(guided) + (1 - phi) * guided
    for w, p in ((scale, phi), (Tensor(np.float32(scale)), Tensor(np.float32(phi)))):
        got = guide(_t(cond), _t(uncond), w, p, phi > 0)
        np.testing.assert_allclose(_np(got), guided, rtol=1e-5, atol=1e-5)


def test_guidance_batch_and_option_checks():
    x, t = _t(np.ones(SHAPE)), Tensor(np.arange(5, dtype=np.int32))
    x2, t2, sc2, c2 = guidance_batch(x, t, None, Tensor(np.array([0, 1, 2, 0, 1], np.int32)), 3)
    assert x2.shape == (10,) + SHAPE[1:] and sc2 is None
    assert t2.asnumpy().tolist() == list(range(5)) * 2
    assert c2.asnumpy().tolist() == [0, 1, 2, 0, 1] + [3] * 5
    # a tensor conditioning (text contexts) brings both halves itself: conditional rows, then unconditional
    ctx, empty = _t(np.full((5, 3, 2), 1.0)), _t(np.full((5, 3, 2), -1.0))
    both = stack_halves(ctx, empty)
    x2, t2, _, c2 = guidance_batch(x, t, None, both, None)
    assert x2.shape == (10,) + SHAPE[1:] and c2 is both and c2.asnumpy()[:5].min() == 1 and c2.asnumpy()[5:].max() == -1
    pair = stack_halves((ctx, ctx), (ctx, empty))
    assert [p.shape for p in pair] == [(10, 3, 2)] * 2 and pair[1].asnumpy()[5:].max() == -1
    assert check_guidance(1.0, 0.0, conditional=False) == (False, False)
    assert check_guidance(4.0, 0.5, conditional=True) == (True, True)
    with pytest.raises(ValueError, match="class-conditional"):
        check_guidance(4.0, 0.0, conditional=False)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_guidance(4.0, 1.5, conditional=True)
    with pytest.raises(ValueError, match="guidance_scale != 1"):
        check_guidance(1.0, 0.5, conditional=True)


# ----------------------------------------------------------------------------- loss terms and label dropout

def test_loss_terms_match_numpy():
    rng = np.random.default_rng(3)
    p, q = rng.standard_normal(SHAPE) * 2, rng.standard_normal(SHAPE)
    d = p - q
    want = {"l2": d * d, "l1": np.abs(d), "huber": np.where(np.abs(d) < 1, 0.5 * d * d, np.abs(d) - 0.5)}
    for kind, w in want.items():
        np.testing.assert_allclose(_np(elementwise_loss(_t(p), _t(q), kind)), w, rtol=1e-5, atol=1e-6)
    m1, m2, l1, l2 = p, q, rng.uniform(-2, 1, SHAPE), rng.uniform(-2, 1, SHAPE)
    kl = np.log(np.exp(0.5 * l2) / np.exp(0.5 * l1)) + (np.exp(l1) + (m1 - m2) ** 2) / (2 * np.exp(l2)) - 0.5
    np.testing.assert_allclose(_np(normal_kl(_t(m1), _t(l1), _t(m2), _t(l2))), kl, rtol=1e-4, atol=1e-5)


def test_label_dropout_is_one_rule_on_host_and_in_graph():
    u = np.array([0.05, 0.5, 0.2, 0.99, 0.3], np.float32)
    labels = np.array([0, 1, 2, 1, 0], np.int32)
    want = np.where(u < 0.3, 3, labels)
    host = drop_labels(labels, u, 0.3, 3)
    assert host.dtype == np.int32 and host.tolist() == want.tolist()
    graph = ms.jit(drop_labels)(Tensor(labels), Tensor(u), 0.3, 3)
    assert graph.asnumpy().tolist() == want.tolist()


# ----------------------------------------------------------------------------- the network contract

class TinyNet(nn.Cell):
    """The contract's smallest network: (B, 1, H, W) -> (B, 1, H, W), class- and self-conditional."""

    def __init__(self, num_classes=3, self_condition=True):
        super().__init__()
        self.channels, self.out_dim = 1, 1
        self.num_classes, self.cond_drop_prob, self.self_condition = num_classes, 0.5, self_condition
        self.conv = nn.Conv2d(2, 1, 3, pad_mode="same", has_bias=True, weight_init="normal")
        self.emb = nn.Embedding(num_classes + 1, 1)

    def construct(self, x, t, x_self_cond=None, classes=None):
        if x_self_cond is None:
            x_self_cond = ops.zeros_like(x)
        h = self.conv(ops.cat((x_self_cond, x), axis=1)) + 0.01 * t.astype(ms.float32).reshape(-1, 1, 1, 1)
        if classes is not None:
            h = h + self.emb(classes.astype(ms.int32)).reshape(-1, 1, 1, 1)
        return h


class NoOutDim(nn.Cell):
    def __init__(self):
        super().__init__()
        self.channels = 1

    def construct(self, x, t, x_self_cond=None, classes=None):
        return x


def test_contract_names_the_missing_attribute():
    with pytest.raises(ValueError, match="`out_dim`") as err:
        check_denoiser_network(NoOutDim())
    assert "NoOutDim" in str(err.value) and "GaussianDiffusion" in str(err.value)
    with pytest.raises(ValueError, match="`out_dim`"):
        GaussianDiffusion(NoOutDim(), image_size=4, timesteps=10)
    assert not isinstance(NoOutDim(), DenoiserNetwork)
    net = TinyNet()
    net.cond_drop_prob = None
    with pytest.raises(ValueError, match="cond_drop_prob"):
        check_denoiser_network(net, where="LatentDiffusion")


def test_networks_of_the_library_satisfy_the_contract():
    from ms_diffusion.diffusion.latent import LatentDenoiser
    from ms_diffusion.models.unet_ldm import UNetModel

    unet = UNetModel(image_size=8, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=1,
                     attention_resolutions=(), channel_mult=(1,), num_heads=1)
    nets = [Unet(dim=8, dim_mults=(1, 2), channels=1, num_classes=3),
            Unet(dim=8, dim_mults=(1, 2), channels=1, block_type="convnext"),   # the tutorial's ConvNeXt U-Net
            LatentDenoiser(unet), TinyNet()]
    for net in nets:
        check_denoiser_network(net)
        assert isinstance(net, DenoiserNetwork)
    with pytest.raises(ValueError, match="`channels`.*LatentDenoiser"):   # ldm's UNetModel needs the adapter
        check_denoiser_network(unet)


# ----------------------------------------------------------------------------- sampling plan

def test_sampling_plan_defaults():
    full = GaussianDiffusion(TinyNet(), image_size=4, timesteps=10)
    fast = GaussianDiffusion(TinyNet(), image_size=4, timesteps=10, sampling_timesteps=4)
    assert full.sampling_plan(None, None) == ("ddpm", 10)
    assert full.sampling_plan("ddim", None) == ("ddim", 10)
    assert fast.sampling_plan(None, None) == ("ddim", 4)
    assert fast.sampling_plan("ddpm", None) == ("ddpm", 10)
    assert fast.sampling_plan("DPM++", 3) == ("dpmpp", 3)
    assert fast.sampling_plan(None, 2) == ("ddim", 2)
    with pytest.raises(ValueError, match="unknown sampler"):
        fast.sampling_plan("nope", None)


# ----------------------------------------------------------------------------- training_loss

def test_training_loss_equals_the_positional_call_in_a_compiled_train_step():
    ms.set_seed(0)
    d = GaussianDiffusion(TinyNet(), image_size=4, timesteps=20, sampling_timesteps=2, objective="pred_v")
    # sample first: the denoiser's jit must not make MindSpore parse another method for d later
    assert d.sample(batch_size=2, seed=0).shape == (2, 1, 4, 4)
    d.set_train(True)
    rng = np.random.default_rng(0)
    img = rng.random((4, 1, 4, 4)).astype(np.float32)
    inputs = d.training_inputs(img, rng, np.array([0, 1, 2, 0]))
    args = (Tensor(img), Tensor(inputs["times"]), Tensor(inputs["noise"]), Tensor(inputs["classes"]))

    for self_cond in (True, False):
        def positional(images, times, noise, classes):
            return d(images, classes, times, noise, self_cond, 0.0)

        def named(images, times, noise, classes):
            return d.training_loss(images, times=times, noise=noise, classes=classes, self_cond=self_cond,
                                   posterior_noise=None)

        results = [TrainStep(fn, nn.SGD(d.trainable_params(), learning_rate=0.0))(*args) for fn in (positional, named)]
        np.testing.assert_array_equal(results[0][0].asnumpy(), results[1][0].asnumpy())   # loss
        np.testing.assert_array_equal(results[0][1].asnumpy(), results[1][1].asnumpy())   # gradient norm
        eager = d.training_loss(args[0], times=args[1], noise=args[2], classes=args[3], self_cond=self_cond)
        np.testing.assert_allclose(eager.asnumpy(), results[1][0].asnumpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="LatentDiffusion"):
        d.training_loss(args[0], times=args[1], noise=args[2], posterior_noise=args[2])
