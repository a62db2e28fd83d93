"""KL autoencoder: the posterior distribution against numpy, ldm's parameter tree, graph = PyNative,
and (when diffusers is installed) encode/decode parity with diffusers' AutoencoderKL."""
import math

import mindspore as ms
import numpy as np
import pytest

from ms_diffusion.models.autoencoder import AutoencoderKL, Decoder, Encoder
from ms_diffusion.models.distributions import DiagonalGaussianDistribution
from ms_diffusion.interop import load_arrays_into
from ms_diffusion.interop.diffusers import vae_plan

TINY = dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=(1, 2),
            num_res_blocks=1, attn_resolutions=(8,), dropout=0.0)


def _moments(seed=0, shape=(2, 6, 3, 5)):
    rng = np.random.default_rng(seed)
    m = rng.standard_normal(shape).astype(np.float32)
    m[:, shape[1] // 2:] *= 3.0
    m[0, -1, 0, 0] = 40.0   # beyond the clamp
    m[1, -1, 0, 0] = -50.0
    return m


def _np_split(m):
    mean, logvar = np.split(m.astype(np.float64), 2, axis=1)
    return mean, np.clip(logvar, -30.0, 20.0)


def test_diagonal_gaussian_matches_numpy():
    m = _moments()
    other_m = _moments(1)
    noise = np.random.default_rng(2).standard_normal((2, 3, 3, 5)).astype(np.float32)
    mean, logvar = _np_split(m)
    omean, ologvar = _np_split(other_m)
    d = DiagonalGaussianDistribution(ms.Tensor(m))
    o = DiagonalGaussianDistribution(ms.Tensor(other_m))

    np.testing.assert_allclose(d.logvar.asnumpy(), logvar, rtol=1e-6)
    np.testing.assert_allclose(d.mode().asnumpy(), mean, rtol=1e-6)
    np.testing.assert_allclose(d.sample(ms.Tensor(noise)).asnumpy(), mean + np.exp(0.5 * logvar) * noise,
                               rtol=1e-5, atol=1e-6)
    kl = 0.5 * np.sum(mean ** 2 + np.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
    np.testing.assert_allclose(d.kl().asnumpy(), kl, rtol=1e-5)
    kl_o = 0.5 * np.sum((mean - omean) ** 2 / np.exp(ologvar) + np.exp(logvar) / np.exp(ologvar) - 1.0 - logvar
                        + ologvar, axis=(1, 2, 3))
    np.testing.assert_allclose(d.kl(o).asnumpy(), kl_o, rtol=1e-5)
    x = noise.astype(np.float64)
    nll = 0.5 * np.sum(math.log(2 * math.pi) + logvar + (x - mean) ** 2 / np.exp(logvar), axis=(1, 2, 3))
    np.testing.assert_allclose(d.nll(ms.Tensor(noise)).asnumpy(), nll, rtol=1e-5)
    np.testing.assert_allclose(d.nll(ms.Tensor(noise), dims=(1,)).asnumpy(),
                               0.5 * np.sum(math.log(2 * math.pi) + logvar + (x - mean) ** 2 / np.exp(logvar), axis=1),
                               rtol=1e-5)
    # drawn noise: right shape, mean + std * N(0, 1)
    assert d.sample().shape == (2, 3, 3, 5)


def test_deterministic_distribution_and_errors():
    m = _moments()
    d = DiagonalGaussianDistribution(ms.Tensor(m), deterministic=True)
    np.testing.assert_array_equal(d.sample().asnumpy(), d.mean.asnumpy())
    np.testing.assert_array_equal(d.kl().asnumpy(), np.zeros(2, np.float32))
    np.testing.assert_array_equal(d.nll(d.mean).asnumpy(), np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="2 \\* channels"):
        DiagonalGaussianDistribution(ms.Tensor(np.zeros((2, 3, 4, 4), np.float32)))
    with pytest.raises(ValueError, match="noise has shape"):
        DiagonalGaussianDistribution(ms.Tensor(m)).sample(ms.Tensor(np.zeros((2, 3, 3, 4), np.float32)))


def test_autoencoder_shapes_and_ldm_parameter_tree():
    ae = AutoencoderKL(TINY, embed_dim=3)
    x = ms.Tensor(np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32))
    dec, moments = ae(x)
    assert dec.shape == (2, 3, 16, 16) and moments.shape == (2, 6, 8, 8)
    post = ae.encode(x)
    assert post.mean.shape == (2, 3, 8, 8)
    assert ae.decode(post.mode()).shape == (2, 3, 16, 16)
    assert ae.latent_shape((5, 3, 32, 48)) == (5, 3, 16, 24)

    names = {n: tuple(p.shape) for n, p in ae.parameters_and_names()}
    assert len(names) == len(list(ae.get_parameters()))
    expected = {
        "encoder.conv_in.weight": (32, 3, 3, 3),
        "encoder.down.0.block.0.norm1.gamma": (32,),
        "encoder.down.0.downsample.conv.weight": (32, 32, 3, 3),
        "encoder.down.1.block.0.nin_shortcut.weight": (64, 32, 1, 1),
        "encoder.down.1.attn.0.q.weight": (64, 64, 1, 1),
        "encoder.mid.attn_1.proj_out.bias": (64,),
        "encoder.mid.block_2.conv2.weight": (64, 64, 3, 3),
        "encoder.norm_out.beta": (64,),
        "encoder.conv_out.weight": (8, 64, 3, 3),
        "decoder.conv_in.weight": (64, 4, 3, 3),
        "decoder.up.1.block.1.conv1.weight": (64, 64, 3, 3),
        "decoder.up.1.attn.1.k.weight": (64, 64, 1, 1),
        "decoder.up.1.upsample.conv.weight": (64, 64, 3, 3),
        "decoder.up.0.block.0.nin_shortcut.weight": (32, 64, 1, 1),
        "decoder.conv_out.weight": (3, 32, 3, 3),
        "quant_conv.weight": (6, 8, 1, 1),
        "post_quant_conv.weight": (4, 3, 1, 1),
    }
    for name, shape in expected.items():
        assert names.get(name) == shape, name
    assert not any("up.0.upsample" in n or "down.1.downsample" in n or "up.0.attn" in n for n in names)
    assert ae.get_last_layer() is ae.decoder.conv_out.weight


def test_decoder_options_and_config_errors():
    cfg = dict(TINY, attn_type="none")
    dec = Decoder(**dict(cfg, give_pre_end=True))
    z = ms.Tensor(np.zeros((1, 4, 8, 8), np.float32))
    assert dec(z).shape == (1, 32, 16, 16)               # last feature map before norm_out
    out = Decoder(**dict(cfg, tanh_out=True))(ms.Tensor(np.random.randn(1, 4, 8, 8).astype(np.float32) * 50))
    assert np.abs(out.asnumpy()).max() <= 1.0
    assert not any("attn" in n for n, _ in Encoder(**cfg).parameters_and_names())
    with pytest.raises(ValueError, match="unknown ddconfig"):
        AutoencoderKL(dict(TINY, chmult=(1, 2)), 4)
    with pytest.raises(ValueError, match="double_z"):
        AutoencoderKL(dict(TINY, double_z=False), 4)
    with pytest.raises(ValueError, match="linear"):
        AutoencoderKL(dict(TINY, attn_type="linear"), 4)
    ae = AutoencoderKL(TINY, 4)
    with pytest.raises(ValueError, match="3-channel"):
        ae.encode(ms.Tensor(np.zeros((1, 1, 16, 16), np.float32)))
    with pytest.raises(ValueError, match="not divisible by 2"):
        ae.encode(ms.Tensor(np.zeros((1, 3, 15, 16), np.float32)))


def test_encoder_downsample_pads_right_and_bottom_only():
    # one conv with a single 1 in the kernel's top-left tap reads input (2i, 2j) for output (i, j):
    # with ldm's (0, 1, 0, 1) padding nothing is shifted; symmetric padding would read (2i-1, 2j-1)
    from ms_diffusion.models.autoencoder import Downsample
    down = Downsample(1, True)
    w = np.zeros((1, 1, 3, 3), np.float32)
    w[0, 0, 0, 0] = 1.0
    down.conv.weight.set_data(ms.Tensor(w))
    down.conv.bias.set_data(ms.Tensor(np.zeros(1, np.float32)))
    x = np.arange(36, dtype=np.float32).reshape(1, 1, 6, 6)
    np.testing.assert_array_equal(down(ms.Tensor(x)).asnumpy(), x[:, :, ::2, ::2])
    pooled = Downsample(1, False)(ms.Tensor(x)).asnumpy()
    np.testing.assert_allclose(pooled, x.reshape(1, 1, 3, 2, 3, 2).mean(axis=(3, 5)))


def test_autoencoder_graph_mode_equals_pynative():
    ae = AutoencoderKL(TINY, 4)
    rng = np.random.default_rng(1)
    x = ms.Tensor(rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32))
    noise = ms.Tensor(rng.standard_normal((2, 4, 8, 8)).astype(np.float32))

    def fwd(x, noise):
        return ae(x, True, noise)

    eager = [t.asnumpy() for t in fwd(x, noise)]
    graph = [t.asnumpy() for t in ms.jit(fwd)(x, noise)]
    for g, e in zip(graph, eager):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def test_autoencoder_matches_diffusers():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2,
                                  block_out_channels=(32, 64), layers_per_block=1, sample_size=16).eval()
    with torch.no_grad():  # non-trivial norms so gamma/beta mix-ups show
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    ours = AutoencoderKL(dict(TINY, attn_resolutions=()), embed_dim=4)
    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    load_arrays_into(ours, vae_plan(ours).to_ms(state))

    x = np.random.default_rng(3).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    z = np.random.default_rng(4).standard_normal((2, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ref_moments = ref.encode(torch.from_numpy(x)).latent_dist.parameters.numpy()
        ref_dec = ref.decode(torch.from_numpy(z)).sample.numpy()
    moments = ours.encode_moments(ms.Tensor(x)).asnumpy()
    dec = ours.decode(ms.Tensor(z)).asnumpy()
    for got, want in ((moments, ref_moments), (dec, ref_dec)):
        rel = np.abs(got - want).max() / np.abs(want).max()
        assert rel < 5e-6, rel  # README: ≤5e-6 (measured 1.7e-6 encoder moments, 2.0e-6 decoder)


_REPEATED_DOWNSAMPLE_STEP = """
import ms_diffusion
import mindspore as ms, numpy as np
from ms_diffusion.models.autoencoder import Downsample
ms.set_context(mode=ms.GRAPH_MODE)
ms.set_seed(0)
down = Downsample(8, True)
params = down.trainable_params()
def loss(x):
    return (down(x) ** 2).mean()
step = ms.jit(ms.value_and_grad(loss, 0, params))
rng = np.random.default_rng(0)
print("compiling", flush=True)
for i in range(30):
    value, (gx, gw) = step(ms.Tensor(rng.standard_normal((4, 8, 8, 8)).astype(np.float32)))
    assert np.isfinite(float(value.asnumpy())) and gx.shape == (4, 8, 8, 8)
    print(f"step {i + 1}", flush=True)
print("30 steps", flush=True)
"""


def test_downsample_backward_survives_many_compiled_steps(tmp_path):
    """ops.pad's backward hung on the 18th call of a compiled step on CPU (the autoencoder's training
    stalled at step 18); Downsample pads with the Pad primitive instead. In a subprocess, so that a
    regression fails here instead of hanging the suite."""
    import subprocess
    import sys

    import queue
    import threading

    # A hang never ends, so any bound catches it; a bound on the total time (compile + 30 steps, normally
    # a few seconds) would also fail a healthy run on a loaded machine. So the bound is on *progress*: the
    # subprocess prints a line after start-up and after every step, and the test fails only when no line
    # arrives for STALL_S -- far longer than start-up, the compile or any one step takes on a busy
    # machine, while a hung step still fails within STALL_S of its start.
    STALL_S = 300
    script = tmp_path / "repeated_downsample_step.py"   # MindSpore compiles only functions with a source file
    script.write_text(_REPEATED_DOWNSAMPLE_STEP)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    progress: "queue.Queue" = queue.Queue()
    errors = []

    def read_stdout():
        for line in proc.stdout:
            progress.put(line.strip())
        progress.put(None)                               # end of output: the process is exiting

    readers = [threading.Thread(target=read_stdout, daemon=True),
               threading.Thread(target=lambda: errors.append(proc.stderr.read()), daemon=True)]
    for reader in readers:
        reader.start()
    seen = []
    try:
        while not seen or seen[-1] is not None:
            try:
                seen.append(progress.get(timeout=STALL_S))
            except queue.Empty:
                raise AssertionError(f"no progress for {STALL_S} s after {seen[-1] if seen else 'start'!r}: "
                                     f"the compiled step hangs") from None
        rc = proc.wait(timeout=STALL_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    readers[1].join(timeout=STALL_S)
    assert rc == 0 and seen[-2:] == ["30 steps", None], "".join(errors)[-2000:]


def test_downsample_pads_right_and_bottom_like_ldm():
    from ms_diffusion.models.autoencoder import Downsample

    down = Downsample(2, True)
    x = np.random.default_rng(0).standard_normal((1, 2, 5, 5)).astype(np.float32)
    w = down.conv.weight.asnumpy()
    b = down.conv.bias.asnumpy()
    padded = np.pad(x, ((0, 0), (0, 0), (0, 1), (0, 1)))
    want = np.zeros((1, 2, 2, 2), np.float32)
    for i in range(2):
        for j in range(2):
            patch = padded[0, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3]
            want[0, :, i, j] = (w * patch[None]).sum(axis=(1, 2, 3)) + b
    np.testing.assert_allclose(down(ms.Tensor(x)).asnumpy(), want, rtol=1e-5, atol=1e-6)
