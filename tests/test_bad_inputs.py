"""Issue 20, items 7-9: evaluation memory bounded by what is asked; output paths checked before sampling;
whole, helpful messages for bad images, YAML syntax errors, PyTorch checkpoints and non-zip .npz files.

Each test reproduces its symptom (it fails on the code before the fix). Messages are checked through
the real command lines (a subprocess where the printed format matters, else ``main(argv)``, which
prints the same lines).
"""
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def _run(args, cwd, env=None):
    return subprocess.run([sys.executable] + [str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)


def _error_lines(stderr: str):
    return [line for line in stderr.strip().splitlines() if line.strip() and "WARNING" not in line]


def _main(module, argv, capsys):
    """(exit code, stderr) of ``python <module>.py argv`` run in this process."""
    code = module.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _write_idx(folder: Path, prefix: str, images: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    n = len(images)
    with open(folder / f"{prefix}-images-idx3-ubyte", "wb") as f:
        f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.astype(np.uint8).tobytes())
    with open(folder / f"{prefix}-labels-idx1-ubyte", "wb") as f:
        f.write(struct.pack(">II", 2049, n) + (np.arange(n) % 10).astype(np.uint8).tobytes())


def _fake_fmnist(folder: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """A Fashion-MNIST look-alike: discs of random radius on noise (IDX files, as the real ones)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28]
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        r = rng.uniform(3, 12, n)[:, None, None]
        images = ((yy - 14) ** 2 + (xx - 14) ** 2 < r * r) * 180 + rng.integers(0, 60, (n, 28, 28))
        _write_idx(folder, prefix, images)
    return folder


# ------------------------------------------------------------------------------------------ 7. evaluation memory

# runs the script argv[1:] and prints its peak resident set at exit: VmHWM, the high-water mark of this process's
# own memory (ru_maxrss would include the resident size of the parent it was forked from, here pytest's)
_PEAK_WRAPPER = """
import atexit, os, runpy, sys
def _peak():
    with open('/proc/self/status') as f:
        print(*[line for line in f if line.startswith('VmHWM:')], end='', flush=True)
atexit.register(_peak)
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def _peak_rss(argv, cwd, env) -> int:
    """Peak resident set (bytes) of ``python argv``, run in a child process."""
    proc = _run(["-c", _PEAK_WRAPPER] + list(argv), cwd, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    kib = [int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("VmHWM:")]
    assert len(kib) == 1, proc.stdout
    return kib[0] * 1024


@pytest.mark.slow
def test_7_evaluation_memory_does_not_grow_with_the_reference_set(tmp_path):
    """100 samples of 3x96x96, --max-reference 120: a 10x larger training split (3000 vs 300 images) used to be
    loaded whole at 3x96x96 (~1 GB more) before the subset was taken; now only what is asked is read."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "s.npz", images=rng.random((100, 3, 96, 96), dtype=np.float32))
    env = dict(os.environ, MS_DIFFUSION_CACHE=str(tmp_path / "cache"))
    peaks = {}
    for n_train in (300, 3000):
        data = _fake_fmnist(tmp_path / f"fm{n_train}", n_train, 100)
        peaks[n_train] = _peak_rss([ROOT / "evaluate.py", "--samples", tmp_path / "s.npz", "--data-dir", data,
                                    "--metric", "fd,memorization", "--max-reference", 120, "--bootstrap", 0,
                                    "--no-cache"], tmp_path, env)
    growth = peaks[3000] - peaks[300]
    print(f"evaluate.py peak RSS: {peaks[300] / 1e6:.0f} MB (300 train images), {peaks[3000] / 1e6:.0f} MB (3000)")
    # 2700 more training images at 3x96x96 are 300 MB as float32: the old code held them several times over
    # (measured: +900 to +1040 MB); now the growth is the data pipeline's queues filling up (measured 20-70 MB)
    assert growth < 200e6, (f"peak RSS grew by {growth / 1e6:.0f} MB "
                            f"({peaks[300] / 1e6:.0f} -> {peaks[3000] / 1e6:.0f} MB)")


def test_7_streamed_evaluation_equals_the_whole_array_computation(tmp_path, monkeypatch):
    """Chunked reading (7 images per chunk, 50 samples per pass over the training set) gives the numbers of the
    whole-array computation the evaluation did before: FD, KID, precision/recall to 1e-10 (the features are
    bit-identical), the memorisation distances to float32 rounding."""
    import ms_diffusion.metrics.data as data_module
    import ms_diffusion.metrics.reference as reference_module
    from ms_diffusion.metrics import (FeatureExtractor, evaluate_samples, fit_to_extractor,
                                      frechet_distance_from_features, gaussian_stats, kernel_inception_distance,
                                      memorization, nearest_training_distances, open_samples, precision_recall)
    from ms_diffusion.metrics.classifier import classifier_outputs, load_classifier
    from ms_diffusion.metrics.data import load_dataset_arrays

    monkeypatch.setenv("MS_DIFFUSION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(reference_module, "_MEMO", {})
    fm = _fake_fmnist(tmp_path / "fm", 200, 60, seed=1)
    net, meta = load_classifier(None)
    calls = []

    def fn(x):
        calls.append(len(x))
        return classifier_outputs(net, x, 16)[0]

    ext = FeatureExtractor(name="t", weights_sha256=meta["sha256"], weights_path="-", dim=net.config.feature_dim,
                           input_shape=(1, 28, 28), description="test classifier", fn=fn, batch_size=16)
    rng = np.random.default_rng(2)
    samples = rng.random((120, 1, 32, 32), dtype=np.float32)   # another size: both sides go 32 -> 28
    np.savez_compressed(tmp_path / "s.npz", images=samples)
    opts = dict(metrics="all", extractor=ext, data_dir=fm, max_reference=150, kid_subsets=4, kid_subset_size=20,
                memorization_held_out=40, seed=3, use_cache=False)

    monkeypatch.setattr(data_module, "CHUNK_BYTES", 7 * 32 * 32 * 4)
    monkeypatch.setattr(reference_module, "QUERY_BYTES", 50 * 32 * 32 * 4)
    streamed = evaluate_samples(open_samples(tmp_path / "s.npz"), "fashion-mnist", **opts)
    # really in chunks: whole batches of 16 but the last of the samples' and of the reference's
    assert sum(calls) == 120 + 150 and max(calls) == 16 and sum(c != 16 for c in calls) == 2, calls

    train = load_dataset_arrays("fashion-mnist", "train", data_dir=fm, image_size=32).images
    test = load_dataset_arrays("fashion-mnist", "test", data_dir=fm, image_size=32).images
    idx = np.sort(np.random.default_rng(3).choice(200, 150, replace=False))
    real = ext(fit_to_extractor(train[idx], ext))
    fake = ext(fit_to_extractor(samples, ext))
    stats = gaussian_stats(real, allow_singular=True)
    assert streamed["fd"] == pytest.approx(frechet_distance_from_features(fake, stats).value, rel=1e-10, abs=1e-12)
    kid = kernel_inception_distance(fake, real, subsets=4, subset_size=20, seed=3)
    assert streamed["kid"] == pytest.approx(kid.mean, rel=1e-10, abs=1e-12)
    pr = precision_recall(real[np.sort(np.random.default_rng(3).choice(150, 120, replace=False))], fake)
    assert (streamed["precision"], streamed["recall"]) == (pr.precision, pr.recall)
    held = nearest_training_distances(test[np.sort(np.random.default_rng(3).choice(60, 40, replace=False))], train)
    memo = memorization(nearest_training_distances(samples, train), held)
    # pixel distances: float32 dot products, whose rounding depends on the matrix shapes BLAS is given (a chunk of
    # the training set, not all of it): |x|^2 + |t|^2 - 2 x.t cancels to ~1e-5 relative, as it did before
    assert streamed["memorization_threshold"] == pytest.approx(memo.threshold, rel=1e-4)
    assert streamed["nn_distance_median"] == pytest.approx(memo.median, rel=1e-4)
    assert streamed["memorization"] == memo.fraction_below
    assert streamed["memorization_train_images"] == 200


# ------------------------------------------------------------------------------------------ 8. sample.py outputs

def _unwritable_dir(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        return locked
    return Path("/sys")   # read-only for root too


@pytest.fixture
def sample_cli():
    from ms_diffusion.cli import sample

    return sample


@pytest.mark.parametrize("flags,flag,says", [
    (["--out", "{tmp}/adir"], "--out", "is a folder"),
    (["--out", "{tmp}/grid"], "--out", "has no extension"),
    (["--out", "{tmp}/grid.xyz"], "--out", "has the extension '.xyz'"),
    (["--gif", "{tmp}/anim.png"], "--gif", ".gif"),
    (["--npz", "{tmp}/raw"], "--npz", ".npz"),
    (["--out", "{tmp}/afile.txt/grid.png"], "--out", "is a file, not a folder"),
    (["--out", "{locked}/sub/grid.png"], "--out", "cannot create"),
    (["--out", "{tmp}/same.gif", "--gif", "{tmp}/same.gif"], "--out", "and --gif both name"),
    (["--out", "{tmp}/new/a/grid.png", "--npz", "{tmp}/new/b/raw.txt"], "--npz", ".npz"),
])
def test_8_sample_output_paths_are_checked_before_the_checkpoint_is_read(tmp_path, sample_cli, capsys, flags, flag,
                                                                         says):
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile.txt").write_text("x")
    argv = ["--ckpt", tmp_path / "no_such_run"] + [f.format(tmp=tmp_path, locked=_unwritable_dir(tmp_path))
                                                   for f in flags]
    code, err = _main(sample_cli, argv, capsys)
    lines = _error_lines(err)
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"sample.py: error: {flag} ") and says in lines[0], err
    assert "no_such_run" not in err   # nothing was loaded, let alone sampled
    assert not (tmp_path / "new").exists()   # no folder left behind


def test_8_sample_output_error_end_to_end(tmp_path):
    """The issue's case: a name without an extension failed after sampling with PIL's 'unknown file extension'."""
    proc = _run([ROOT / "sample.py", "--ckpt", tmp_path / "no_such_run", "--out", "grid"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("sample.py: error: --out 'grid' has no extension; --out writes an image: end the "
                               "name with .png .jpg") and lines[0].endswith("e.g. --out grid.png"), proc.stderr
    assert "unknown file extension" not in proc.stderr and not (tmp_path / "grid").exists()


def test_8_evaluate_json_path_is_checked_before_the_work(tmp_path, capsys):
    from ms_diffusion.cli import evaluate

    (tmp_path / "out").mkdir()
    code, err = _main(evaluate, ["--samples", tmp_path / "none.npz", "--json", tmp_path / "out"], capsys)
    assert code == 2 and "--json" in err and "is a folder" in err and "none.npz" not in err, err


# ------------------------------------------------------------------------------------------ 9. messages

def test_9_bad_images_list_every_file_and_the_skip_bad_fix(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(images / f"{i}.png")
    (images / "notes.png").write_text("not an image")
    good = (images / "0.png").read_bytes()
    (images / "cut.png").write_bytes(good[:len(good) // 2])
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(images / "small.png")
    cfg = {"name": "tiny", "model": {"type": "unet", "dim": 8, "dim_mults": [1, 2], "channels": 1},
           "diffusion": {"type": "gaussian", "image_size": 16, "timesteps": 10, "sampling_timesteps": 2},
           "data": {"name": "image_folder", "data_dir": str(images), "num_workers": 1},
           "train": {"num_steps": 1, "batch_size": 2, "sample_every": 0, "num_samples": 0, "progress": False}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    proc = _run([ROOT / "train.py", "--config", tmp_path / "tiny.yaml", "--out-dir", tmp_path / "run"], tmp_path)
    err = proc.stderr
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert "3 of 11 images cannot be used" in err
    for name in ("notes.png", "cut.png", "small.png"):
        assert any(str(images / name) in line for line in err.splitlines()), (name, err)
    assert "is 8x8 (WxH), smaller than the requested 16x16" in err
    assert "data.skip_bad: true" in err and "--set data.skip_bad=true" in err, err
    assert "BytesIO object at" not in err, err   # PIL's message names a buffer, not the file
    # the fix it names works
    from ms_diffusion.config import load_config
    from ms_diffusion.data import build_source

    data = load_config(str(tmp_path / "tiny.yaml"), ["data.skip_bad=true"]).data
    source = build_source("image_folder", data_dir=data["data_dir"], image_size=16, channels=1,
                          skip_bad=data["skip_bad"])
    assert source.total_samples == 8 and len(source.skipped) == 3


def test_9_yaml_syntax_error_names_file_line_and_column(tmp_path):
    (tmp_path / "broken.yaml").write_text("name: x\nmodel:\n  type: unet\n  dim: [8, 16\ntrain:\n  lr: 1\n")
    proc = _run([ROOT / "train.py", "--config", "broken.yaml"], tmp_path)
    lines = _error_lines(proc.stderr)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("train.py: error: broken.yaml, line 5, column 6: invalid YAML: expected ',' or ']'")
    assert "flow sequence that starts at line 4, column 8" in lines[0]
    assert lines[1:] == ["  train:", "       ^"], proc.stderr
    assert "<unicode string>" not in proc.stderr
    (tmp_path / "tabs.yaml").write_text("model:\n\ttype: unet\n")
    proc = _run([ROOT / "train.py", "--config", "tabs.yaml"], tmp_path)
    assert "tabs.yaml, line 2, column 1" in proc.stderr and "spaces, not tabs" in proc.stderr, proc.stderr


def _torch_zip(path: Path) -> Path:
    """The layout torch.save writes (a zip holding <name>/data.pkl), without needing torch."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{path.stem}/data.pkl", pickle.dumps({"model": {}}, protocol=2))
        z.writestr(f"{path.stem}/version", "3\n")
    return path


def test_9_pytorch_checkpoint_says_convert_it(tmp_path):
    _torch_zip(tmp_path / "model-10.pt")
    proc = _run([ROOT / "sample.py", "--ckpt", "model-10.pt"], tmp_path)
    lines = _error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "model-10.pt is a PyTorch checkpoint" in lines[0] and "scripts/convert_checkpoint.py" in lines[0]
    assert "python scripts/convert_checkpoint.py from-lucidrains model-10.pt model-10_ms.ckpt" in lines[0]
    assert "format must same" not in proc.stderr


@pytest.mark.parametrize("name,content", [
    ("weights.pth", "zip"),
    ("sd-v1-5.ckpt", "zip"),                                   # ldm checkpoints are torch files named .ckpt
    ("legacy.ckpt", pickle.dumps({"state_dict": {}}, protocol=2)),
    ("pytorch_model.bin", pickle.dumps({}, protocol=4)),
])
def test_9_pytorch_checkpoint_variants(tmp_path, name, content):
    from ms_diffusion.pipeline import load_diffusion
    from ms_diffusion.io.checkpoint import CheckpointError

    path = tmp_path / name
    _torch_zip(path) if content == "zip" else path.write_bytes(content)
    with pytest.raises(CheckpointError, match="PyTorch checkpoint.*scripts/convert_checkpoint.py"):
        load_diffusion(path)


def test_9_npz_that_is_not_a_zip_names_the_file(tmp_path, capsys):
    (tmp_path / "samples.npz").write_text("these are not images")
    proc = _run([ROOT / "evaluate.py", "--samples", "samples.npz"], tmp_path)
    lines = _error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("evaluate.py: error: cannot read samples samples.npz: it is not an .npz (zip) archive")
    assert "sample.py --npz" in lines[0]
    from ms_diffusion.cli import evaluate

    np.save(tmp_path / "one.npy", np.zeros((4, 1, 28, 28), np.float32))
    os.replace(tmp_path / "one.npy", tmp_path / "one.npz")   # an .npy under the .npz name: used to be a TypeError
    code, err = _main(evaluate, ["--samples", tmp_path / "one.npz"], capsys)
    assert code == 2 and str(tmp_path / "one.npz") in err and "single .npy array" in err, err
    np.savez(tmp_path / "full.npz", images=np.zeros((4, 1, 28, 28), np.float32))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "full.npz").read_bytes()[:300])   # truncated
    code, err = _main(evaluate, ["--samples", tmp_path / "cut.npz"], capsys)
    assert code == 2 and str(tmp_path / "cut.npz") in err and "Traceback" not in err, err
