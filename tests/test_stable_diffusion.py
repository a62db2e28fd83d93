"""Stable Diffusion end to end against diffusers: tiny random StableDiffusion pipelines (SD 1.x-like:
quick-GELU CLIP, epsilon; SD 2.x-like: GELU CLIP padding with "!", v-prediction, linear projections;
an inpainting UNet) with the real CLIP tokenizer, saved by diffusers and loaded by us; from the same
prompts, initial latents, posterior noise and DDIM grid (image-to-image also Euler and DPM-Solver++), the
decoded images must agree (fp32, 1e-4)."""
import numpy as np
import pytest

import mindspore as ms

from ms_diffusion.io.state import ConversionError
from ms_diffusion.stable_diffusion import StableDiffusion
from tests.test_clip_text import clip_tokenizer_folder

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

PROMPTS = ["a photo of a cat", "a red car, highly detailed"]
NEGATIVE = ["blurry", "dark, low quality"]
SIZE, LATENT = 16, 8          # pixels; the tiny VAE downsamples by 2


def _perturbed(module, seed):
    """Every weight moved off its init (zero-initialised output convs included), so no path is trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module.eval()


def _pipeline(root, kind):
    """Build, save and return (folder, diffusers pipeline) of one tiny pipeline kind: sd1, sd2 or inpaint."""
    sd2 = kind == "sd2"
    torch.manual_seed(0)
    tokenizer_dir = clip_tokenizer_folder(root / f"{kind}_tokenizer", pad_token="!" if sd2 else None)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    text_config = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                              hidden_act="gelu" if sd2 else "quick_gelu", eos_token_id=49407,
                                              bos_token_id=49406, pad_token_id=1)
    text_encoder = transformers.CLIPTextModel(text_config).eval()
    unet = diffusers.UNet2DConditionModel(
        sample_size=LATENT, in_channels=9 if kind == "inpaint" else 4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=(2, 4) if sd2 else 4, use_linear_projection=sd2, norm_num_groups=8)
    vae = tiny_vae((16, 32), groups=8)
    return save_pipeline(root, kind, unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         v_prediction=sd2, inpainting=kind == "inpaint")


def tiny_vae(channels, groups):
    """A two-level AutoencoderKL (f = 2, 4 latent channels) for SIZE-pixel images."""
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=channels,
                                   latent_channels=4, norm_num_groups=groups, sample_size=SIZE, layers_per_block=1)


def save_pipeline(root, kind, *, unet, vae, text_encoder, tokenizer, v_prediction, inpainting=False):
    """(folder, pipeline): the UNet and VAE moved off their init, SD's DDIM scheduler (leading grid, offset 1,
    final alpha of step 0), saved by diffusers under ``root / kind``."""
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                        prediction_type="v_prediction" if v_prediction else "epsilon")
    cls = diffusers.StableDiffusionInpaintPipeline if inpainting else diffusers.StableDiffusionPipeline
    pipe = cls(vae=_perturbed(vae, 1), text_encoder=text_encoder, tokenizer=tokenizer, unet=_perturbed(unet, 2),
               scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    folder = root / kind
    pipe.save_pretrained(str(folder))
    return folder, pipe


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    return {kind: _pipeline(root, kind) for kind in ("sd1", "sd2", "inpaint")}


@pytest.fixture(scope="module")
def ours(pipelines):
    """ours(kind): one StableDiffusion per pipeline, loaded once and shared by the tests that leave it as it is
    (each instance compiles its own graphs: reuse saves ~2 s per graph)."""
    loaded = {}

    def get(kind):
        if kind not in loaded:
            loaded[kind] = StableDiffusion.from_diffusers(pipelines[kind][0])
        return loaded[kind]
    return get


def _latents(seed, n=2):
    return torch.randn(n, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(seed))


def _images(seed, n=2):
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _close(ours, theirs_nhwc, atol=1e-4):
    ours = ours.asnumpy().transpose(0, 2, 3, 1)
    inside = (theirs_nhwc > 0.01) & (theirs_nhwc < 0.99)
    assert inside.mean() > 0.5, "the reference images are mostly clipped: the comparison would be weak"
    print(f"max |ours - diffusers| = {np.abs(ours - theirs_nhwc).max():.2g} ({inside.mean():.0%} of pixels unclipped)")
    np.testing.assert_allclose(ours, theirs_nhwc, rtol=0, atol=atol)


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_txt2img_equals_diffusers(pipelines, ours, kind):
    pipe, sd = pipelines[kind][1], ours(kind)
    assert sd.ldm.objective == ("pred_v" if kind == "sd2" else "pred_noise")
    assert sd.tokenizer.pad_token == ("!" if kind == "sd2" else "<|endoftext|>")
    latents = _latents(3)
    with torch.no_grad():
        ref = pipe(PROMPTS, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=4,
                   guidance_scale=5.0, latents=latents.clone(), output_type="np").images
        ref_latents = pipe(PROMPTS, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=4,
                           guidance_scale=5.0, latents=latents.clone(), output_type="latent").images.numpy()
        ref_plain = pipe(PROMPTS[:1], height=SIZE, width=SIZE, num_inference_steps=3, guidance_scale=1.0,
                         latents=latents[:1].clone(), output_type="np").images
    ours = sd(PROMPTS, negative_prompt=NEGATIVE, steps=4, guidance_scale=5.0, latents=ms.Tensor(latents.numpy()))
    assert ours.shape == (2, 3, SIZE, SIZE)
    _close(ours, ref)
    ours_latents = sd(PROMPTS, negative_prompt=NEGATIVE, steps=4, guidance_scale=5.0,
                      latents=ms.Tensor(latents.numpy()), return_latents=True).asnumpy()
    np.testing.assert_allclose(ours_latents, ref_latents, rtol=0, atol=1e-4 * np.abs(ref_latents).max())
    _close(sd(PROMPTS[:1], steps=3, guidance_scale=1.0, latents=ms.Tensor(latents[:1].numpy())), ref_plain)


SCHEDULERS = {"ddim": None, "euler": "EulerDiscreteScheduler", "dpmpp": "DPMSolverMultistepScheduler"}


def _with_scheduler(pipe, cls, sampler):
    """A diffusers pipeline of class ``cls`` on ``pipe``'s components with the scheduler of ``sampler``, on the
    saved scheduler's grid (leading spacing, offset 1: Euler's and DPM-Solver's own default is linspace)."""
    components = dict(pipe.components)
    if SCHEDULERS[sampler]:
        components["scheduler"] = getattr(diffusers, SCHEDULERS[sampler]).from_config(
            pipe.scheduler.config, timestep_spacing="leading")
    out = cls(**components)
    out.set_progress_bar_config(disable=True)
    return out


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
def test_img2img_equals_diffusers(pipelines, ours, sampler):
    img2img = _with_scheduler(pipelines["sd1"][1], diffusers.StableDiffusionImg2ImgPipeline, sampler)
    sd = ours("sd1")
    image = _images(5)
    with torch.no_grad():
        ref = img2img(PROMPTS, image=image, strength=0.6, num_inference_steps=5, guidance_scale=4.0,
                      negative_prompt=NEGATIVE, generator=torch.Generator().manual_seed(7), output_type="np").images
    # diffusers draws the VAE posterior sample, then the forward noise, from the one generator
    g = torch.Generator().manual_seed(7)
    posterior_noise = torch.randn(2, 4, LATENT, LATENT, generator=g).numpy()
    noise = torch.randn(2, 4, LATENT, LATENT, generator=g).numpy()
    ours = sd.img2img(PROMPTS, image.numpy(), strength=0.6, steps=5, guidance_scale=4.0, negative_prompt=NEGATIVE,
                      posterior_noise=posterior_noise, noise=noise, sampler=sampler)
    _close(ours, ref)


def _inpainting_inputs(seed):
    image = _images(seed)
    mask = torch.zeros(2, 1, SIZE, SIZE)
    mask[0, :, 4:12, 2:10] = 1.0
    mask[1, :, 8:, :] = 0.7                     # binarised at 0.5
    return image, mask


def test_inpaint_equals_diffusers(pipelines, ours):
    pipe, sd = pipelines["inpaint"][1], ours("inpaint")
    assert sd.is_inpainting and sd.ldm.conditioning_key == "hybrid"
    image, mask = _inpainting_inputs(9)
    latents = _latents(11)
    with torch.no_grad():
        ref = pipe(PROMPTS, image=image, mask_image=mask, height=SIZE, width=SIZE, num_inference_steps=4,
                   guidance_scale=3.0, latents=latents.clone(), generator=torch.Generator().manual_seed(13),
                   output_type="np").images
    masked_image_noise = torch.randn(2, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(13)).numpy()
    ours = sd.inpaint(PROMPTS, image.numpy(), mask.numpy(), steps=4, guidance_scale=3.0,
                      latents=ms.Tensor(latents.numpy()), masked_image_noise=masked_image_noise)
    _close(ours, ref)


@pytest.mark.parametrize("kind", ["inpaint", "sd1"])
def test_inpaint_below_full_strength_equals_diffusers(pipelines, ours, kind):
    """strength 0.6 of 5 steps: the start is the image's latents noised to the grid's third step, three steps
    run; with the inpainting UNet and with an ordinary one (blended)."""
    inpaint = _with_scheduler(pipelines[kind][1], diffusers.StableDiffusionInpaintPipeline, "ddim")
    sd = ours(kind)
    image, mask = _inpainting_inputs(33)
    kwargs = dict(strength=0.6, guidance_scale=4.0, negative_prompt=NEGATIVE)
    with torch.no_grad():
        ref = inpaint(PROMPTS, image=image, mask_image=mask, height=SIZE, width=SIZE, num_inference_steps=5,
                      generator=torch.Generator().manual_seed(35), output_type="np", **kwargs).images
    # diffusers' draws below strength 1: the image's posterior, the noise, the masked image's posterior
    g = torch.Generator().manual_seed(35)
    posterior_noise, noise, masked_image_noise = (torch.randn(2, 4, LATENT, LATENT, generator=g).numpy()
                                                  for _ in range(3))
    ours = sd.inpaint(PROMPTS, image.numpy(), mask.numpy(), steps=5, latents=noise, posterior_noise=posterior_noise,
                      masked_image_noise=masked_image_noise, **kwargs)
    _close(ours, ref)
    full = sd.inpaint(PROMPTS, image.numpy(), mask.numpy(), steps=5, latents=noise, posterior_noise=posterior_noise,
                      masked_image_noise=masked_image_noise, **dict(kwargs, strength=1.0))
    assert np.abs(full.asnumpy() - ours.asnumpy()).max() > 0.05      # strength acts


def test_attention_slicing_and_vae_tiling(pipelines, ours):
    """Attention in slices gives the same images; VAE tiling gives diffusers' tiled encode / decode (its seams
    included) and, end to end at twice the model's size, diffusers' images with ``enable_vae_tiling``."""
    folder, pipe = pipelines["sd1"]
    latents = _latents(25)
    plain = ours("sd1")(PROMPTS, steps=3, guidance_scale=4.0, latents=ms.Tensor(latents.numpy())).asnumpy()
    sd = StableDiffusion.from_diffusers(folder).enable_attention_slicing(16)   # 64 latent pixels: 4 slices
    sliced = sd(PROMPTS, steps=3, guidance_scale=4.0, latents=ms.Tensor(latents.numpy())).asnumpy()
    np.testing.assert_allclose(sliced, plain, rtol=0, atol=2e-6)

    sd.enable_vae_tiling()                       # tiles of the model's 16 pixels, as diffusers' sample_size
    pipe.vae.enable_tiling()
    try:
        z = torch.randn(2, 4, 2 * LATENT, 2 * LATENT + 4, generator=torch.Generator().manual_seed(27))
        x = torch.rand(1, 3, 2 * SIZE + 8, 2 * SIZE, generator=torch.Generator().manual_seed(29)) * 2 - 1
        with torch.no_grad():
            ref_dec = pipe.vae.decode(z).sample.numpy()
            ref_mean = pipe.vae.encode(x).latent_dist.mean.numpy()
        ours_dec = sd.vae.tiled(sd.vae.decode, ms.Tensor(z.numpy()), latents=True).asnumpy()
        np.testing.assert_allclose(ours_dec, ref_dec, rtol=0, atol=1e-4 * np.abs(ref_dec).max())
        whole = sd.vae.decode(ms.Tensor(z.numpy())).asnumpy()
        assert np.abs(whole - ref_dec).max() > 1e-3        # the tiles really are decoded apart
        moments = sd.vae.tiled(sd.vae.encode_moments, ms.Tensor(x.numpy()), latents=False).asnumpy()
        np.testing.assert_allclose(moments[:, :4], ref_mean, rtol=0, atol=1e-4 * np.abs(ref_mean).max())
        big = torch.randn(2, 4, 2 * LATENT, 2 * LATENT, generator=torch.Generator().manual_seed(31))
        with torch.no_grad():
            ref = pipe(PROMPTS, height=2 * SIZE, width=2 * SIZE, num_inference_steps=2, guidance_scale=3.0,
                       latents=big.clone(), output_type="np").images
        _close(sd(PROMPTS, height=2 * SIZE, width=2 * SIZE, steps=2, guidance_scale=3.0,
                  latents=ms.Tensor(big.numpy())), ref)
    finally:
        pipe.vae.disable_tiling()


def test_half_precision_stays_close_to_float32(pipelines, ours):
    """--precision fp16: the text encoder, UNet and VAE compute in float16 (norms and softmax in float32); the
    images are float32 and close to the float32 ones (themselves equal to diffusers'). bf16 is refused on CPU."""
    from ms_diffusion.stable_diffusion import resolve_precision

    assert [resolve_precision("auto", d) for d in ("CPU", "GPU", "Ascend")] == ["fp32", "fp16", "fp16"]
    folder, _ = pipelines["sd2"]                               # v-prediction
    latents, image = _latents(41), _images(43)
    full = ours("sd2")
    half = StableDiffusion.from_diffusers(folder).set_precision("fp16")
    assert half.precision == "fp16"
    x, t, context = ms.Tensor(latents.numpy()), ms.Tensor(np.array([10, 10], np.int32)), full.encode_prompt(PROMPTS)
    assert half.unet(x, t, context).dtype == ms.float16 and full.unet(x, t, context).dtype == ms.float32
    for call in (lambda sd: sd(PROMPTS, negative_prompt=NEGATIVE, steps=3, guidance_scale=5.0,
                               latents=ms.Tensor(latents.numpy())),
                 lambda sd: sd.img2img(PROMPTS, image.numpy(), strength=0.7, steps=4, guidance_scale=3.0, seed=5)):
        ref, ours = call(full).asnumpy(), call(half)
        assert ours.dtype == ms.float32
        err = np.abs(ours.asnumpy() - ref).max()
        print(f"fp16 vs fp32: max |difference| {err:.2g}")
        assert 0 < err < 2e-2                                # float16 really computed, and close
    with pytest.raises(ValueError, match="bfloat16 does not run on CPU.*use fp32 \\(or fp16\\) on CPU"):
        StableDiffusion.from_diffusers(folder).set_precision("bf16")


def test_user_errors_are_clear(ours, tmp_path):
    sd = ours("sd1")
    with pytest.raises(ValueError, match="multiples of 4"):
        sd("a cat", height=15, width=16, steps=2)
    with pytest.raises(ValueError, match="negative_prompt acts through guidance"):
        sd("a cat", negative_prompt="dog", guidance_scale=1.0, steps=2)
    with pytest.raises(ValueError, match="2 negative prompts for 1 prompts"):
        sd("a cat", negative_prompt=["a", "b"], steps=2)
    with pytest.raises(ValueError, match="mask must be"):
        sd.inpaint("a cat", np.zeros((1, 3, SIZE, SIZE)), np.zeros((1, 1, SIZE, 8)), steps=2)
    with pytest.raises(ValueError, match="strength must lie in"):
        sd.img2img("a cat", np.zeros((1, 3, SIZE, SIZE)), strength=0.0, steps=2)
    with pytest.raises(ConversionError, match="model_index.json is missing"):
        StableDiffusion.from_diffusers(tmp_path)


def test_sample_cli_text_to_image(pipelines, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    folder = pipelines["sd1"][0]

    def run(*args):
        return subprocess.run([sys.executable, str(root / "sample.py"), "--ckpt", str(folder), "--no-progress",
                               *map(str, args)], capture_output=True, text=True, timeout=600)

    proc = run("--prompt", "a cat", "--prompt", "a dog", "--negative-prompt", "blurry", "--num", 2, "--steps", 2,
               "--out", tmp_path / "grid.png", "--npz", tmp_path / "raw.npz")
    assert proc.returncode == 0, proc.stderr
    assert "4 images from" in proc.stdout and (tmp_path / "grid.png").is_file()
    raw = np.load(tmp_path / "raw.npz")
    assert raw["images"].shape == (4, 3, SIZE, SIZE) and list(raw["prompts"]) == ["a cat"] * 2 + ["a dog"] * 2
    proc = run("--prompt", "a cat", "--mask", tmp_path / "grid.png", "--out", tmp_path / "x.png")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "sample.py: error: --mask needs --init-image (the image to inpaint)"]
    proc = run("--prompt", "a cat", "--precision", "bf16", "--out", tmp_path / "y.png")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "sample.py: error: --precision bf16: bfloat16 does not run on CPU: MindSpore's CPU backend has no bfloat16 "
        "kernels for Conv2D, MatMul, BiasAdd, Sigmoid or Softmax (it falls back to float32 kernels for float16 "
        "only); use fp32 (or fp16) on CPU"]
    assert not (tmp_path / "y.png").exists()


def test_load_image_reads_rgb_and_masks(tmp_path):
    from PIL import Image

    from ms_diffusion.imageio import load_image

    pixels = (np.random.default_rng(0).uniform(0, 1, (6, 4, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "rgb.png")
    rgb = load_image(tmp_path / "rgb.png")
    assert rgb.shape == (1, 3, 6, 4) and rgb.dtype == np.float32
    np.testing.assert_allclose(rgb[0].transpose(1, 2, 0), pixels / 255.0, atol=1e-7)
    mask = load_image(tmp_path / "rgb.png", "L", size=(12, 8))
    assert mask.shape == (1, 1, 12, 8) and 0 <= mask.min() <= mask.max() <= 1
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image(tmp_path / "none.png")
