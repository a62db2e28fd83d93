"""Latent diffusion end to end through the CLIs, in process: train a tiny autoencoder (two optimizers,
PatchGAN on from step 3), resume it exactly from a mid-run checkpoint, train a class-conditional
latent diffusion on its run folder, load that with the pipeline and sample it; bad inputs are
one-line errors."""
import hashlib
import json
import shutil

import numpy as np
import pytest
import yaml

from ms_diffusion.cli.sample import main as sample_main
from ms_diffusion.cli.train import main as train_main
from ms_diffusion.diffusion import LatentDiffusion
from ms_diffusion.io.checkpoint import latest_checkpoint, load_checkpoint, load_safetensors
from tests.test_train_cli import _images

pytestmark = pytest.mark.slow   # two small training runs through the CLIs (~1.5 min on 2 cores)

# The resume starts inside the GAN phase (the PatchGAN joins at step 3, the resume at step 4), so the
# discriminator, its BatchNorm statistics and its optimizer state all have to come back exactly.
AE_STEPS, AE_SAVE, DISC_START = 6, 4, 3
AE_SAVE_EVERY = 2
LDM_STEPS, LDM_SAVE = 4, 2

AE_CONFIG = {
    "name": "tiny_ae",
    "seed": 1,
    "model": {"type": "autoencoder_kl", "embed_dim": 4,
              "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 16, "in_channels": 1, "out_ch": 1,
                           "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [],
                           "dropout": 0.0}},
    "loss": {"type": "lpips_discriminator", "disc_start": DISC_START, "kl_weight": 1.0e-6, "disc_weight": 0.5,
             "disc_in_channels": 1, "disc_num_layers": 1, "disc_ndf": 16, "perceptual_weight": 0.0},
    "train": {"num_steps": AE_STEPS, "batch_size": 4, "lr": 1e-3, "adam_betas": [0.5, 0.9], "clip_grad_norm": None,
              "log_every": 1, "save_every": AE_SAVE_EVERY, "keep_last": 5, "sample_every": AE_STEPS, "num_samples": 4,
              "progress": False},
}

# one U-Net stage (attention at full latent size): nothing here depends on the depth, and each train step
# and sampling graph compiles ~20% faster than with two stages
LDM_CONFIG = {
    "name": "tiny_ldm",
    "seed": 2,
    "model": {"type": "unet_ldm", "image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32,
              "channel_mult": [1], "num_res_blocks": 1, "attention_resolutions": [1], "num_head_channels": 16,
              "use_spatial_transformer": True, "context_dim": 16},
    "diffusion": {"type": "latent", "conditioning_key": "crossattn", "num_classes": 2, "cond_drop_prob": 0.2,
                  "scale_by_std": True, "timesteps": 50, "sampling_timesteps": 3},
    "train": {"num_steps": LDM_STEPS, "batch_size": 4, "lr": 1e-3, "log_every": 1, "save_every": LDM_SAVE,
              "sample_every": 0, "num_samples": 0, "ema_update_after_step": 1, "ema_update_every": 1,
              "ema_decay": 0.9, "progress": False},
    "sample": {"num": 4, "steps": 3, "sampler": "ddim"},
}


def _write(path, cfg):
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(capsys, config, out_dir, *extra):
    """train.py in process; returns (exit code, stdout, stderr)."""
    capsys.readouterr()
    rc = train_main(["--config", str(config), "--out-dir", str(out_dir), *map(str, extra)])
    out, err = capsys.readouterr()
    return rc, out, err


def _error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip() and "WARNING" not in line]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent")
    _images(root / "images")
    data = {"name": "image_folder", "data_dir": str(root / "images"), "random_flip": True, "num_workers": 1}
    _write(root / "ae.yaml", dict(AE_CONFIG, data=data))
    _write(root / "ldm.yaml", dict(LDM_CONFIG, data=data,
                                   diffusion=dict(LDM_CONFIG["diffusion"], first_stage=str(root / "ae"))))
    return root


@pytest.fixture(scope="module")
def autoencoder_run(workdir):
    rc = train_main(["--config", str(workdir / "ae.yaml"), "--out-dir", str(workdir / "ae")])
    assert rc == 0
    return workdir / "ae"


def test_autoencoder_run_folder(autoencoder_run):
    records = [json.loads(line) for line in (autoencoder_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, AE_STEPS + 1))
    for r in records:
        assert np.isfinite(r["rec_loss"]) and r["rec_loss"] > 0 and np.isfinite(r["kl_loss"])
        # the discriminator joins at disc_start: before it no GAN term and no discriminator step
        if r["step"] <= DISC_START:
            assert r["g_loss"] == 0.0 and r["d_weight"] == 0.0 and "disc_loss" not in r
        else:
            assert r["disc_factor"] == 1.0 and r["d_weight"] > 0 and np.isfinite(r["disc_loss"])
    assert (autoencoder_run / "reconstructions" / f"step_{AE_STEPS:08d}.png").is_file()
    arrays, meta = load_safetensors(autoencoder_run / "model.safetensors")
    assert meta["weights"] == "online" and meta["step"] == AE_STEPS and meta["config"]["model"]["type"] == \
        "autoencoder_kl"
    final, _ = load_checkpoint(latest_checkpoint(autoencoder_run / "checkpoints"))
    assert set(arrays) == {k[len("online."):] for k in final if k.startswith("online.")}
    for name, value in arrays.items():
        np.testing.assert_array_equal(value, final[f"online.{name}"])


def _resume_matches(capsys, config, run, resumed, start: int, end: int, log_keys):
    """Resume a copy of ``run``'s step-``start`` checkpoint in ``resumed`` (as after a kill); its step-``end``
    checkpoint must equal the uninterrupted run's bit for bit, RNG and data position included, and its log
    lines the run's from ``start`` on. Returns the uninterrupted checkpoint's arrays."""
    mid = run / "checkpoints" / f"step_{start:08d}.ckpt"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(mid, resumed / "checkpoints" / mid.name)
    rc, out, err = _train(capsys, config, resumed, "--resume")
    assert rc == 0, err
    assert f"resumed from {resumed / 'checkpoints' / mid.name} at step {start}" in out
    name = f"step_{end:08d}.ckpt"
    full, full_meta = load_checkpoint(run / "checkpoints" / name)
    again, again_meta = load_checkpoint(resumed / "checkpoints" / name)
    assert set(full) == set(again)
    for key in full:
        np.testing.assert_array_equal(full[key], again[key], err_msg=key)
    assert again_meta["rng"] == full_meta["rng"] and again_meta["batch_in_epoch"] == full_meta["batch_in_epoch"]
    full_log = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]
    resumed_log = [json.loads(l) for l in (resumed / "log.jsonl").read_text().splitlines()]
    for key in log_keys:
        assert [r[key] for r in resumed_log] == [r[key] for r in full_log[start:]], key
    return full


def test_autoencoder_resume_is_exact(workdir, autoencoder_run, capsys):
    """Restarting from the step-4 checkpoint, inside the GAN phase, ends on the uninterrupted run's weights,
    discriminator (with BatchNorm statistics), logvar and both optimizers' moments, bit for bit."""
    full = _resume_matches(capsys, workdir / "ae.yaml", autoencoder_run, workdir / "ae_resumed", AE_SAVE, AE_STEPS,
                           ("rec_loss", "disc_loss"))
    assert {"online", "loss", "optimizer", "disc_optimizer"} <= {key.split(".", 1)[0] for key in full}
    assert any(k.startswith("loss.discriminator.") and "moving_mean" in k for k in full)
    assert any(k.startswith("disc_optimizer.") and "moment1" in k for k in full)


@pytest.fixture(scope="module")
def latent_run(workdir, autoencoder_run):
    rc = train_main(["--config", str(workdir / "ldm.yaml"), "--out-dir", str(workdir / "ldm")])
    assert rc == 0
    return workdir / "ldm"


def test_latent_checkpoint_holds_the_first_stage_and_its_scale(workdir, autoencoder_run, latent_run):
    from mindspore import Tensor

    from ms_diffusion.config import load_config
    from ms_diffusion.experiment import build_data_source
    from ms_diffusion.models.distributions import split_moments
    from ms_diffusion.pipeline import load_autoencoder

    arrays, meta = load_checkpoint(latest_checkpoint(latent_run / "checkpoints"))
    assert meta["step"] == LDM_STEPS
    first = meta["first_stage"]
    source_file = autoencoder_run / "checkpoints" / f"step_{AE_STEPS:08d}.ckpt"
    assert first["path"] == str(source_file) and first["step"] == AE_STEPS
    assert first["sha256"] == hashlib.sha256(source_file.read_bytes()).hexdigest()
    # the frozen first stage is saved unchanged, in the online and the EMA weights
    ae_arrays, _ = load_safetensors(autoencoder_run / "model.safetensors")
    for name, value in ae_arrays.items():
        np.testing.assert_array_equal(arrays[f"online.first_stage_model.{name}"], value, err_msg=name)
        np.testing.assert_array_equal(arrays[f"ema.first_stage_model.{name}"], value, err_msg=name)
    # scale_by_std: 1 / std of the first batch's sampled latents, noise from SeedSequence([seed, 2])
    cfg = load_config(str(workdir / "ldm.yaml"))
    autoencoder, _ = load_autoencoder(autoencoder_run)
    images, _ = next(iter(build_data_source(cfg, autoencoder).epoch(0, cfg.train.batch_size)))
    mean, logvar = (m.asnumpy() for m in split_moments(autoencoder.encode_moments(Tensor(images * 2 - 1))))
    noise = np.random.default_rng([cfg.seed, 2]).standard_normal(mean.shape).astype(np.float32)
    z = (mean + np.exp(0.5 * logvar) * noise).astype(np.float64)
    scale = float(arrays["online.scale_factor"])
    assert scale == pytest.approx(1.0 / z.std(ddof=1), rel=1e-4)
    assert float(arrays["ema.scale_factor"]) == scale and scale != 1.0


def test_latent_resume_is_exact(workdir, latent_run, capsys):
    """Resumed from its mid-run checkpoint, the latent diffusion ends on the uninterrupted run's weights, EMA,
    optimizer state and RNG, bit for bit, its scale factor included."""
    full = _resume_matches(capsys, workdir / "ldm.yaml", latent_run, workdir / "ldm_resumed", LDM_SAVE, LDM_STEPS,
                           ("loss",))
    assert {"online", "ema", "optimizer"} <= {key.split(".", 1)[0] for key in full}


def test_latent_sampling_from_checkpoint_and_export(workdir, latent_run, capsys):
    from ms_diffusion.pipeline import generate, load_diffusion

    out = workdir / "samples"
    capsys.readouterr()
    rc = sample_main(["--ckpt", str(latent_run), "--num", "4", "--class", "1", "--guidance-scale", "2.0",
                      "--seed", "5", "--out", str(out / "grid.png"), "--npz", str(out / "raw.npz"),
                      "--gif", str(out / "anim.gif"), "--no-progress"])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    assert f"4 images from {latent_run / 'checkpoints'}" in stdout
    raw = np.load(out / "raw.npz")
    assert raw["images"].shape == (4, 1, 16, 16) and raw["classes"].tolist() == [1, 1, 1, 1]
    assert 0.0 <= raw["images"].min() and raw["images"].max() <= 1.0 and raw["images"].std() > 0
    assert (out / "grid.png").is_file() and (out / "anim.gif").is_file()
    # the exported EMA weights rebuild the same model (first stage included): the same images
    cfg, diffusion, meta = load_diffusion(latent_run / "model.safetensors")
    assert isinstance(diffusion, LatentDiffusion) and diffusion.num_classes == 2
    assert meta["first_stage"]["step"] == AE_STEPS
    again = generate(diffusion, 4, batch_size=cfg.sample.batch_size, seed=5, sampler="ddim", steps=3,
                     classes=[1] * 4, guidance_scale=2.0)
    np.testing.assert_allclose(again.images, raw["images"], atol=1e-5)


def test_bad_inputs_are_one_line_errors(workdir, autoencoder_run, latent_run, capsys):
    # a latent config without its autoencoder
    rc, _, err = _train(capsys, workdir / "ldm.yaml", workdir / "bad", "--set", "diffusion.first_stage=null")
    assert rc == 2 and "diffusion.first_stage: the latent diffusion needs its autoencoder" in _error_line(err)
    rc, _, err = _train(capsys, workdir / "ldm.yaml", workdir / "bad", "--set",
                        f"diffusion.first_stage={workdir / 'nowhere'}")
    assert rc == 2 and f"diffusion.first_stage: checkpoint '{workdir / 'nowhere'}' does not exist" in \
        _error_line(err)
    # a diffusion run named as the first stage
    rc, _, err = _train(capsys, workdir / "ldm.yaml", workdir / "bad", "--set",
                        f"diffusion.first_stage={latent_run}")
    assert rc == 2 and "is a 'unet_ldm' checkpoint, not an autoencoder" in _error_line(err)
    # an autoencoder checkpoint where a diffusion model is expected
    capsys.readouterr()
    rc = sample_main(["--ckpt", str(autoencoder_run), "--no-progress"])
    assert rc == 2 and "is an autoencoder checkpoint, not a diffusion model" in _error_line(capsys.readouterr().err)
    # a unet that does not denoise the autoencoder's latents
    rc, _, err = _train(capsys, workdir / "ldm.yaml", workdir / "bad", "--set", "model.in_channels=3", "--set",
                        "model.out_channels=3")
    assert rc == 2 and "model.in_channels / out_channels are 3 / 3 but the first stage's latents have 4 " \
        "channels" in _error_line(err)
    # autoencoder training is float32
    rc, _, err = _train(capsys, workdir / "ae.yaml", workdir / "bad", "--amp", "O1")
    assert rc == 2 and "autoencoder training runs in float32; set train.amp to O0" in _error_line(err)
