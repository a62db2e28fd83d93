"""Autoencoder losses: GAN losses, the adaptive weight against a direct computation, one compiled
generator / discriminator step each lowering its loss, disc_start gating, the PatchGAN and ActNorm,
and LPIPS parity with the ``lpips`` package (torchvision stubbed, see ``_install_torchvision_stub``)."""
import importlib.util
import sys
import types
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from ms_diffusion.losses import (DISCRIMINATOR_LOG_KEYS, GENERATOR_LOG_KEYS, LPIPS, DiscriminatorLoss, GeneratorLoss,
                                 LPIPSWithDiscriminator, adopt_weight, convert_lpips_state_dict, hinge_d_loss,
                                 logs_to_dict, vanilla_d_loss)
from ms_diffusion.models.autoencoder import AutoencoderKL
from ms_diffusion.models.discriminator import ActNorm, NLayerDiscriminator

ROOT = Path(__file__).resolve().parents[1]
DD = dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=(1, 2),
          num_res_blocks=1, attn_resolutions=(), dropout=0.0)


def _batch(seed=0, b=2):
    rng = np.random.default_rng(seed)
    x = ms.Tensor(rng.uniform(-1, 1, (b, 3, 16, 16)).astype(np.float32))
    noise = ms.Tensor(rng.standard_normal((b, 4, 8, 8)).astype(np.float32))
    return x, noise


def _np_softplus(x):
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0)


def test_gan_losses_and_gating_match_numpy():
    rng = np.random.default_rng(0)
    real, fake = rng.standard_normal((2, 1, 3, 3)) * 3, rng.standard_normal((2, 1, 3, 3)) * 3
    r, f = ms.Tensor(real.astype(np.float32)), ms.Tensor(fake.astype(np.float32))
    np.testing.assert_allclose(float(hinge_d_loss(r, f)),
                               0.5 * (np.maximum(1 - real, 0).mean() + np.maximum(1 + fake, 0).mean()), rtol=1e-5)
    np.testing.assert_allclose(float(vanilla_d_loss(r, f)),
                               0.5 * (_np_softplus(-real).mean() + _np_softplus(fake).mean()), rtol=1e-5)
    assert float(adopt_weight(0.7, ms.Tensor(4, ms.int32), 5)) == 0.0
    assert abs(float(adopt_weight(0.7, 5, 5)) - 0.7) < 1e-7


def _loss(**kw):
    base = dict(disc_start=0, perceptual_weight=0.0, disc_ndf=8, disc_num_layers=2)
    base.update(kw)
    return LPIPSWithDiscriminator(**base)


def test_adaptive_weight_matches_direct_gradient_norms():
    ms.set_seed(1)
    ae = AutoencoderKL(DD, 4)
    loss = _loss(perceptual_model=LPIPS(), perceptual_weight=0.5, logvar_init=0.3, disc_weight=0.7, kl_weight=1e-3)
    gen = GeneratorLoss(ae, loss)
    gen.set_train(True)
    x, noise = _batch()
    step = ms.Tensor(10, ms.int32)
    total, logs, _ = gen(x, step, noise)
    logs = dict(zip(GENERATOR_LOG_KEYS, (float(v.asnumpy()) for v in logs)))

    # the definition: torch.autograd.grad of each loss at the decoder's last weight, through the whole model
    last = ae.get_last_layer()

    def nll_fn(x, noise):
        rec, _ = ae(x, True, noise)
        lv = loss.logvar
        return (loss.reconstruction_loss(x, rec) / ops.exp(lv) + lv).sum() / x.shape[0]

    def g_fn(x, noise):
        rec, _ = ae(x, True, noise)
        return -loss.discriminator(rec).mean()

    nll_grad = ms.grad(nll_fn, grad_position=None, weights=[last])(x, noise)[0].asnumpy()
    g_grad = ms.grad(g_fn, grad_position=None, weights=[last])(x, noise)[0].asnumpy()
    expected = min(max(np.linalg.norm(nll_grad) / (np.linalg.norm(g_grad) + 1e-4), 0.0), 1e4) * 0.7
    np.testing.assert_allclose(logs["d_weight"], expected, rtol=1e-4)
    np.testing.assert_allclose(logs["nll_loss"], float(nll_fn(x, noise)), rtol=1e-5)
    np.testing.assert_allclose(logs["g_loss"], float(g_fn(x, noise)), rtol=1e-5)
    np.testing.assert_allclose(float(total), logs["nll_loss"] + 1e-3 * logs["kl_loss"]
                               + logs["d_weight"] * logs["g_loss"], rtol=1e-5)

    # and the step's gradient is that of nll + kl_weight * kl + d_weight * g with d_weight held constant
    params = gen.generator_parameters()
    d_w = logs["d_weight"]

    def direct(x, noise):
        rec, moments = ae(x, True, noise)
        mean, logvar = ops.chunk(moments, 2, axis=1)
        logvar = ops.clamp(logvar, -30.0, 20.0)
        kl = 0.5 * (mean * mean + ops.exp(logvar) - 1.0 - logvar).sum() / x.shape[0]
        return nll_fn(x, noise) + 1e-3 * kl + d_w * g_fn(x, noise)

    want = ms.grad(direct, grad_position=None, weights=params)(x, noise)
    got = ms.value_and_grad(gen, None, params, has_aux=True)(x, step, noise)[1]
    got = np.concatenate([g.asnumpy().ravel() for g in got])
    want = np.concatenate([w.asnumpy().ravel() for w in want])
    assert np.linalg.norm(got - want) <= 1e-4 * np.linalg.norm(want)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()

    # the trainer's path: the GAN terms computed first (their own graph), then passed in as constants
    gan = gen.gan_terms(x, step, noise)
    np.testing.assert_allclose(float(gan[2]), logs["d_weight"], rtol=1e-6)
    total_pre, logs_pre, _ = gen(x, step, noise, True, gan)
    np.testing.assert_allclose(float(total_pre), float(total), rtol=1e-6)
    np.testing.assert_allclose([float(v.asnumpy()) for v in logs_pre], list(logs.values()), rtol=1e-6)
    got_pre = ms.value_and_grad(gen, None, params, has_aux=True)(x, step, noise, True, ms.mutable(gan))[1]
    got_pre = np.concatenate([g.asnumpy().ravel() for g in got_pre])
    np.testing.assert_allclose(got_pre, got, rtol=1e-5, atol=1e-6 * np.abs(got).max())


def test_disc_start_gates_the_gan_terms():
    ae = AutoencoderKL(DD, 4)
    loss = _loss(disc_start=100)
    gen, dis = GeneratorLoss(ae, loss), DiscriminatorLoss(loss)
    gen.set_train(True)
    dis.set_train(True)
    x, noise = _batch()
    early = ms.Tensor(99, ms.int32)
    total, logs, rec = gen(x, early, noise)
    logs = dict(zip(GENERATOR_LOG_KEYS, (float(v.asnumpy()) for v in logs)))
    assert logs["disc_factor"] == 0.0 and logs["d_weight"] > 0
    np.testing.assert_allclose(float(total), logs["nll_loss"] + logs["kl_loss"], rtol=1e-6)
    total_no_gan, logs_no_gan, _ = gen(x, early, noise, False)
    np.testing.assert_allclose(float(total_no_gan), float(total), rtol=1e-6)
    assert float(logs_no_gan[GENERATOR_LOG_KEYS.index("g_loss")].asnumpy()) == 0.0
    d_loss, d_logs = dis(x, rec, early)
    assert float(d_loss) == 0.0
    d_loss, d_logs = dis(x, rec, ms.Tensor(100, ms.int32))
    assert float(d_loss) > 0
    named = logs_to_dict(DISCRIMINATOR_LOG_KEYS, d_logs)
    assert set(named) == {"train/disc_loss", "train/logits_real", "train/logits_fake"}


def _adam_step(params, grads, lr):
    opt = nn.Adam(params, learning_rate=lr, beta1=0.5, beta2=0.9)
    opt(tuple(grads))


def test_one_compiled_generator_and_discriminator_step_reduce_their_losses():
    ms.set_seed(3)
    ae = AutoencoderKL(DD, 4)
    loss = _loss(kl_weight=1e-6)
    gen, dis = GeneratorLoss(ae, loss), DiscriminatorLoss(loss)
    gen.set_train(True)
    dis.set_train(True)
    x, noise = _batch(5)
    step = ms.Tensor(0, ms.int32)
    g_params, d_params = gen.generator_parameters(), dis.discriminator_parameters()
    assert not {p.name for p in g_params} & {p.name for p in d_params}
    assert all(p is not loss.logvar for p in g_params)   # ldm never optimises logvar unless learn_logvar
    gen_step = ms.jit(ms.value_and_grad(gen, None, g_params, has_aux=True))
    dis_step = ms.jit(ms.value_and_grad(dis, None, d_params, has_aux=True))

    (before, logs, rec), grads = gen_step(x, step, noise, True)
    assert all(np.isfinite(g.asnumpy()).all() for g in grads)
    _adam_step(g_params, grads, 2e-4)
    (after, _, _), _ = gen_step(x, step, noise, True)
    assert float(after) < float(before)

    (d_before, _), d_grads = dis_step(x, rec, step)
    _adam_step(d_params, d_grads, 2e-3)
    (d_after, _), _ = dis_step(x, rec, step)
    assert float(d_after) < float(d_before)


def test_patchgan_discriminator_structure_and_init():
    ms.set_seed(0)
    disc = NLayerDiscriminator(input_nc=1, ndf=64, n_layers=3)
    assert disc(ms.Tensor(np.zeros((2, 1, 32, 32), np.float32))).shape == (2, 1, 2, 2)
    params = dict(disc.parameters_and_names())
    assert "main.0.bias" in params and "main.2.bias" not in params and "main.3.gamma" in params
    assert abs(params["main.2.weight"].asnumpy().std() - 0.02) < 0.002
    assert abs(params["main.3.gamma"].asnumpy().mean() - 1.0) < 0.01
    assert {"main.3.moving_mean", "main.3.moving_variance", "main.3.beta"} <= set(params)
    act = dict(NLayerDiscriminator(3, 8, 2, use_actnorm=True).parameters_and_names())
    assert {"main.2.bias", "main.3.loc", "main.3.scale", "main.3.initialized"} <= set(act)


def test_actnorm_data_dependent_init_in_pynative_and_graph():
    x = np.random.default_rng(0).standard_normal((4, 3, 5, 5)).astype(np.float32) * 2 + 1
    for compiled in (False, True):
        layer = ActNorm(3)
        layer.set_train(True)
        fn = ms.jit(layer.construct) if compiled else layer
        out = fn(ms.Tensor(x)).asnumpy()
        flat = x.transpose(1, 0, 2, 3).reshape(3, -1)
        loc, scale = -flat.mean(1), 1.0 / (flat.std(1, ddof=1) + 1e-6)
        np.testing.assert_allclose(layer.loc.asnumpy().ravel(), loc, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer.scale.asnumpy().ravel(), scale, rtol=1e-5)
        assert int(layer.initialized.asnumpy()) == 1
        np.testing.assert_allclose(out.transpose(1, 0, 2, 3).reshape(3, -1).mean(1), 0.0, atol=1e-5)
        fn(ms.Tensor(x * 3.0))    # initialised once only
        np.testing.assert_allclose(layer.loc.asnumpy().ravel(), loc, rtol=1e-5, atol=1e-6)


def test_missing_lpips_weights_disable_the_perceptual_loss():
    with pytest.warns(UserWarning, match="perceptual"):
        loss = LPIPSWithDiscriminator(disc_start=0, perceptual_weight=1.0, disc_ndf=8)
    assert loss.perceptual_weight == 0.0 and not loss.has_perceptual
    with pytest.raises(FileNotFoundError, match="convert_lpips_weights"):
        LPIPSWithDiscriminator(disc_start=0, lpips_ckpt="/nonexistent/lpips.ckpt")
    with pytest.raises(ValueError, match="disc_loss"):
        LPIPSWithDiscriminator(disc_start=0, disc_loss="wasserstein", perceptual_weight=0.0)


# ---------------------------------------------------------------- LPIPS against the lpips package

_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _torch_vgg16_features(torch):
    """torchvision's ``vgg16().features`` layout (31 layers), randomly initialised."""
    layers, c = [], 3
    for v in _VGG16_CFG:
        if v == "M":
            layers.append(torch.nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [torch.nn.Conv2d(c, v, kernel_size=3, padding=1), torch.nn.ReLU(inplace=True)]
            c = v
    return torch.nn.Sequential(*layers)


def _install_torchvision_stub(monkeypatch, torch):
    """PyPI torchvision does not import beside torch 2.13 CPU here; lpips only needs ``models.vgg16(...).features``.

    The stub returns our torch VGG16 feature stack with torchvision's layer indices; lpips itself
    (scaling layer, slicing, normalisation, lin layers and their shipped weights) is unchanged.
    """
    models = types.ModuleType("torchvision.models")
    models.vgg16 = lambda pretrained=False, **kw: types.SimpleNamespace(features=_torch_vgg16_features(torch))
    tv = types.ModuleType("torchvision")
    tv.models = models
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)


@pytest.fixture
def lpips_reference(monkeypatch):
    torch = pytest.importorskip("torch")
    if importlib.util.find_spec("lpips") is None:
        pytest.skip("the lpips package is not installed (pip install --no-deps lpips)")
    if "lpips" not in sys.modules:
        _install_torchvision_stub(monkeypatch, torch)
    import lpips

    torch.manual_seed(0)
    torch.set_num_threads(2)
    # shipped v0.1 lin weights, random VGG trunk (pnet_rand)
    return torch, lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()


def test_lpips_matches_lpips_package(lpips_reference):
    torch, ref = lpips_reference
    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    ours = LPIPS()
    ours.load_arrays(convert_lpips_state_dict(state))
    rng = np.random.default_rng(0)
    a = rng.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    b = np.clip(a + 0.3 * rng.standard_normal(a.shape), -1, 1).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    got = ours(ms.Tensor(a), ms.Tensor(b)).asnumpy()
    assert got.shape == want.shape == (2, 1, 1, 1)
    assert np.abs(got - want).max() <= 5e-7 * np.abs(want).max()  # README: ≤5e-7 (measured 7.5e-8)
    assert np.allclose(ours(ms.Tensor(a), ms.Tensor(a)).asnumpy(), 0.0, atol=1e-6)


def test_lpips_conversion_script_round_trip(tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(1)
    vgg = {f"features.{k}": v for k, v in _torch_vgg16_features(torch).state_dict().items()}
    vgg["classifier.0.weight"] = torch.zeros(4, 4)        # torchvision's head is dropped
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save(lin, tmp_path / "lin.pth")
    spec = importlib.util.spec_from_file_location("convert_lpips_weights",
                                                  ROOT / "scripts" / "convert_lpips_weights.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "lpips.ckpt"
    assert script.main(["--lin", str(tmp_path / "lin.pth"), "--vgg", str(tmp_path / "vgg16.pth"),
                        "--out", str(out)]) == 0
    model = LPIPS.from_checkpoint(str(out))
    params = dict(model.parameters_and_names())
    np.testing.assert_array_equal(params["net.slice3.14.weight"].asnumpy(), vgg["features.14.weight"].numpy())
    np.testing.assert_array_equal(params["lin4.model.1.weight"].asnumpy(), lin["lin4.model.1.weight"].numpy())
    with pytest.raises(ValueError, match="missing"):
        LPIPS().load_arrays({k: v for k, v in convert_lpips_state_dict(
            {k: v.numpy() for k, v in lin.items()}).items()})
