"""Periodic evaluation during training: the evaluator's number, best.safetensors, resume, config errors."""
import json

import mindspore as ms
import numpy as np
import pytest

from ms_diffusion import GaussianDiffusion, Unet
from ms_diffusion.config import ConfigError, config_from_dict
from ms_diffusion.experiment import build_diffusion
from ms_diffusion.metrics import FeatureExtractor, fit_to_extractor, frechet_distance_from_features, gaussian_stats
from ms_diffusion.pipeline import generate, load_diffusion
from ms_diffusion.training import TrainConfig, Trainer
from ms_diffusion.io.checkpoint import load_checkpoint, load_safetensors
from ms_diffusion.evaluation import SampleEvaluator, build_evaluator

from .test_training import FixedBatches


def _tiny(num_classes=None):
    return GaussianDiffusion(Unet(dim=8, dim_mults=(1, 2), channels=1, num_classes=num_classes), image_size=8,
                             timesteps=20, sampling_timesteps=3, objective="pred_noise", beta_schedule="cosine")


def _pixel_extractor(shape=(1, 4, 4)):
    """A deterministic 'feature network': the pixels of images resized to 4x4 (dim 16)."""
    return FeatureExtractor(name="pixels", weights_sha256="0" * 64, weights_path="", dim=int(np.prod(shape)),
                            input_shape=shape, description="4x4 pixel features",
                            fn=lambda x: x.reshape(len(x), -1))


class _Ref:
    def __init__(self, features):
        self.stats = gaussian_stats(features)

    def describe(self):
        return "test reference"


@pytest.mark.slow
def test_evaluator_is_the_frechet_distance_of_seeded_samples():
    ms.set_seed(0)
    diffusion = _tiny(num_classes=3)
    ext = _pixel_extractor()
    ref = _Ref(np.random.default_rng(1).random((200, 16)).astype(np.float32))
    ev = SampleEvaluator(ext, ref, num=40, batch_size=16, seed=7, num_classes=3,
                         sample_options={"sampler": "ddim", "steps": 3, "guidance_scale": 2.0})
    a, b = ev(diffusion), ev(diffusion)
    assert a["fd"] == b["fd"] and a["num"] == 40 and a["features"] == ext.key   # fixed seed: reproducible
    out = generate(diffusion, 40, batch_size=16, seed=7, classes=[i % 3 for i in range(40)], sampler="ddim",
                   steps=3, guidance_scale=2.0)
    direct = frechet_distance_from_features(ext(fit_to_extractor(out.images, ext)), ref.stats).value
    assert a["fd"] == pytest.approx(direct, rel=1e-6)
    with pytest.raises(ValueError, match="train.eval_num .* must exceed the feature dimension"):
        SampleEvaluator(ext, ref, num=16)


def test_fit_to_extractor_channels_and_size():
    ext = _pixel_extractor((1, 4, 4))
    flat = np.full((2, 3, 8, 8), 0.5, np.float32)
    flat[:, 0] = 1.0
    out = fit_to_extractor(flat, ext)
    assert out.shape == (2, 1, 4, 4)
    np.testing.assert_allclose(out, 0.299 + (0.587 + 0.114) * 0.5, atol=1e-6)  # PIL's L weights; flat stays flat
    same = np.random.default_rng(0).random((2, 1, 4, 4)).astype(np.float32)
    assert fit_to_extractor(same, ext) is not None and np.array_equal(fit_to_extractor(same, ext), same)
    up = fit_to_extractor(np.random.default_rng(0).random((1, 1, 3, 3)).astype(np.float32), ext)
    assert up.shape == (1, 1, 4, 4) and up.min() >= 0 and up.max() <= 1


# one U-Net stage: the best-weights bookkeeping does not depend on the network, and each of the three Trainers
# of test_best_weights_are_kept_and_survive_resume compiles its train step (~4 s less than with two stages)
TINY = {"name": "t", "model": {"type": "unet", "dim": 8, "dim_mults": [1], "channels": 1},
        "diffusion": {"type": "gaussian", "image_size": 8, "timesteps": 20, "sampling_timesteps": 3,
                      "objective": "pred_noise", "beta_schedule": "cosine"}}


def _trainer(out_dir, num_steps, fds):
    """A Trainer whose evaluator returns fds[step] (a scripted quality curve)."""
    images = np.random.default_rng(0).random((8, 1, 8, 8)).astype(np.float32)
    exp = config_from_dict(TINY)
    cfg = TrainConfig(num_steps=num_steps, batch_size=4, lr=1e-3, log_every=1, save_every=2, keep_last=10,
                      sample_every=0, num_samples=0, progress=False, ema_update_after_step=0, ema_update_every=1,
                      eval_every=2, eval_num=100)
    trainer = Trainer(build_diffusion(exp), build_diffusion(exp), FixedBatches(images), cfg, out_dir,
                      meta={"config": exp.to_dict()}, log=lambda *a: None)
    trainer.evaluate_fn = lambda ema: {"fd": fds[trainer.step], "num": 100, "features": "scripted", "seconds": 0.0}
    return trainer


@pytest.mark.slow
def test_best_weights_are_kept_and_survive_resume(tmp_path):
    fds = {2: 5.0, 4: 3.0, 6: 4.0, 8: 2.5}
    trainer = _trainer(tmp_path, 6, fds)
    summary = trainer.fit()
    records = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval"]["fd"], r["best_step"]) for r in records if "eval" in r]
    assert evals == [(2, 5.0, 2), (4, 3.0, 4), (6, 4.0, 4)]
    assert summary["best_eval"]["step"] == 4 and summary["best_eval"]["fd"] == 3.0
    best, meta = load_safetensors(tmp_path / "best.safetensors")
    assert meta["step"] == 4 and meta["eval"]["fd"] == 3.0 and meta["weights"] == "ema"
    ckpt4, _ = load_checkpoint(tmp_path / "checkpoints" / "step_00000004.ckpt")
    for name, value in best.items():       # exactly the EMA weights of step 4, not those of the last step
        np.testing.assert_array_equal(value, ckpt4[f"ema.{name}"], err_msg=name)
    final, _ = load_safetensors(tmp_path / "model.safetensors")
    assert any(not np.array_equal(final[k], best[k]) for k in best)

    resumed = _trainer(tmp_path, 8, fds)
    resumed.fit(resume=tmp_path / "checkpoints" / "step_00000006.ckpt")
    assert resumed.best_eval["step"] == 8      # knew the best (3.0 at step 4) and beat it at step 8
    assert load_safetensors(tmp_path / "best.safetensors")[1]["step"] == 8

    worse = _trainer(tmp_path / "w", 8, {**fds, 8: 9.0})
    worse.fit()
    assert worse.best_eval["step"] == 4
    _, diffusion, info = load_diffusion(tmp_path / "w" / "best.safetensors")   # usable by sample.py
    assert info.get("step") == 4


@pytest.mark.parametrize("train,message", [
    ({"eval_every": 10, "eval_features": "inception"}, "inception needs train.eval_weights"),
    ({"eval_every": -1}, "eval_every must be >= 0"),
    ({"eval_every": 5, "eval_features": "pixels"}, r"eval_features must be one of \(.classifier., .inception.\)"),
])
def test_eval_config_errors(train, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        config_from_dict({**TINY, "train": train})


def test_autoencoder_runs_refuse_periodic_fd():
    cfg = config_from_dict({"model": {"type": "autoencoder_kl", "embed_dim": 4,
                                      "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 16,
                                                   "in_channels": 1, "out_ch": 1, "ch": 8, "ch_mult": [1, 2],
                                                   "num_res_blocks": 1, "attn_resolutions": []}},
                            "loss": {"type": "lpips_discriminator", "disc_start": 10, "disc_in_channels": 1,
                                     "perceptual_weight": 0.0},
                            "train": {"eval_every": 10}})
    with pytest.raises(ValueError, match="applies to diffusion models"):
        build_evaluator(cfg)


@pytest.mark.slow
def test_train_cli_evaluates_with_the_classifier_and_keeps_best(tmp_path, monkeypatch, capsys):
    """train.py with train.eval_every: the shipped classifier's features, the reference of the run's own
    data (an image folder here) cached under MS_DIFFUSION_CACHE, best.safetensors that sample.py reads."""
    import yaml

    from ms_diffusion.cli.sample import main as sample_main
    from ms_diffusion.cli.train import main as train_main
    from tests.test_train_cli import _images

    monkeypatch.setenv("MS_DIFFUSION_CACHE", str(tmp_path / "cache"))
    _images(tmp_path / "images")
    cfg = {"name": "evalrun", "seed": 0, "mode": "pynative",
           "model": {"type": "unet", "dim": 8, "dim_mults": [1], "channels": 1, "num_classes": 2},   # (see TINY)
           "diffusion": {"type": "gaussian", "image_size": 16, "timesteps": 20, "sampling_timesteps": 2},
           "data": {"name": "image_folder", "data_dir": str(tmp_path / "images"), "num_workers": 1},
           "train": {"num_steps": 2, "batch_size": 4, "log_every": 1, "save_every": 2, "sample_every": 2,
                     "num_samples": 4, "progress": False, "eval_every": 1, "eval_num": 100},
           "sample": {"batch_size": 50, "guidance_scale": 2.0}}
    (tmp_path / "evalrun.yaml").write_text(yaml.safe_dump(cfg))
    assert train_main(["--config", str(tmp_path / "evalrun.yaml"), "--out-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "note: the classifier features were learned on Fashion-MNIST" in out and "best: FD" in out
    evals = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines() if '"eval"' in l]
    assert [e["step"] for e in evals] == [1, 2]
    assert all(np.isfinite(e["eval"]["fd"]) and e["eval"]["num"] == 100 for e in evals)
    assert evals[0]["eval"]["features"].startswith("fmnist-classifier-")
    assert list((tmp_path / "cache" / "metrics").glob("ref-image_folder-train-*.npz"))   # reference cached
    best_step = evals[-1]["best_step"]
    assert load_safetensors(tmp_path / "run" / "best.safetensors")[1]["step"] == best_step
    assert sample_main(["--ckpt", str(tmp_path / "run" / "best.safetensors"), "--num", "2", "--steps", "2",
                        "--out", str(tmp_path / "s.png"), "--no-progress", "--mode", "pynative"]) == 0
    assert (tmp_path / "s.png").is_file() and (tmp_path / "run" / "samples" / "step_00000002.png").is_file()
