"""EDM and flow matching end to end: train.py trains them, resumes bit-exactly, sample.py samples them with
classifier-free guidance; and the in-graph entry point ``diffusion(images)`` (a user's own jit step)."""
from pathlib import Path

import numpy as np
import pytest
import yaml

from ms_diffusion.io.checkpoint import latest_checkpoint, load_checkpoint
from tests.test_train_cli import _images, _Started

ROOT = Path(__file__).resolve().parent.parent

_DIFFUSIONS = {
    "edm": {"type": "edm", "image_size": 16, "sigma_data": 0.5, "P_mean": -1.0, "sampling_timesteps": 3},
    "flow": {"type": "flow", "image_size": 16, "time_sampling": "uniform", "shift": 2.0, "sampling_timesteps": 3},
}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("objectives")
    _images(root / "images", n_per_class=8)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("objective", sorted(_DIFFUSIONS))
def test_train_resume_exactly_and_sample_guided(images, objective):
    cfg = {
        "name": f"tiny_{objective}", "seed": 4,
        # one U-Net stage: the objectives do not depend on the depth; each of the four processes compiles it
        "model": {"type": "unet", "dim": 8, "dim_mults": [1], "channels": 1, "num_classes": 2,
                  "cond_drop_prob": 0.3},
        "diffusion": _DIFFUSIONS[objective],
        "data": {"name": "image_folder", "data_dir": str(images / "images"), "random_flip": True, "num_workers": 1},
        "train": {"num_steps": 4, "batch_size": 4, "lr": 1e-3, "lr_schedule": "constant", "warmup_steps": 0,
                  "save_every": 2, "keep_last": 5, "log_every": 1, "sample_every": 0, "num_samples": 0,
                  "progress": False, "ema_update_after_step": 0, "ema_decay": 0.9},
    }
    config = images / f"{objective}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    full, part = images / f"{objective}_full", images / f"{objective}_part"
    # two processes at a time, one per core: the straight run beside the first half, then the resume beside sampling
    straight = resumed = None
    try:
        straight = _Started([ROOT / "train.py", "--config", config, "--out-dir", full], images)
        _Started([ROOT / "train.py", "--config", config, "--out-dir", part, "--steps", 2], images).wait()
        resumed = _Started([ROOT / "train.py", "--config", config, "--out-dir", part, "--resume"], images)
        straight.wait()
        out = images / f"{objective}_raw.npz"
        proc = _Started([ROOT / "sample.py", "--ckpt", full, "--num", 2, "--class", 1, "--guidance-scale", 2.5, "--npz",
                         out, "--out", images / f"{objective}.png", "--seed", 1, "--no-progress"], images).wait()
        resumed.wait()
    finally:
        for run in (straight, resumed):
            if run is not None:
                run.stop()
    (a, meta_a), (b, meta_b) = (load_checkpoint(latest_checkpoint(run / "checkpoints")) for run in (full, part))
    assert meta_a["step"] == meta_b["step"] == 4 and set(a) == set(b)
    assert any(k.startswith("optimizer.moment1") for k in a) and any(k.startswith("ema.") for k in a)
    for key in sorted(a):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert meta_a["rng"] == meta_b["rng"]

    assert "2 images from" in proc.stdout
    raw = np.load(out)["images"]
    assert raw.shape == (2, 1, 16, 16) and np.isfinite(raw).all() and 0 <= raw.min() <= raw.max() <= 1
