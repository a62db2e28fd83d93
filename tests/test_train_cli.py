"""train.py / sample.py end to end on generated data: kill -9 and resume equality, sampling outputs, errors."""
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import yaml
from PIL import Image

from ms_diffusion.io.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
# killed at step 12: after the step-8 checkpoint (epoch 1, batch 2: 24 images, batches of 4), before step 16's;
# the resumed run redoes steps 9-16, across the end of epoch 1
STEPS, SAVE_EVERY, STOP_AT = 16, 8, 12
HANG_GUARD_S = 900                         # only a hung run takes this long (the whole run: under a minute)

# train.py, stopped by SIGSTOP right after it logs step STOP_AT (the step's update, EMA and log line are
# done; its checkpoint, if any, is not). The test waits for the stop with waitpid(WUNTRACED) -- the kernel
# reports the event itself, so no polling interval or machine load can make the kill land late -- then
# sends SIGKILL to the stopped process: from the run folder's point of view a kill -9 at a known step,
# 10 updates past the last checkpoint, which the resumed run has to redo exactly.
_STOPPING_TRAIN = """
import os, signal, sys
sys.path.insert(0, {root!r})
import ms_diffusion  # CPU workaround first, as train.py
from ms_diffusion.cli.train import main
from ms_diffusion.training.trainer import Trainer

_log_line = Trainer._log_line
def _log_line_then_stop(self, record):
    _log_line(self, record)
    if record.get("step") == {stop_at} and "loss" in record:
        os.kill(os.getpid(), signal.SIGSTOP)
Trainer._log_line = _log_line_then_stop
sys.exit(main())
"""


def _images(folder: Path, n_per_class=12, size=16):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    for label, name in enumerate(("circles", "stripes")):
        (folder / name).mkdir(parents=True)
        for i in range(n_per_class):
            if label == 0:
                r = rng.uniform(3, 7)
                img = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < r * r) * 220
            else:
                img = (((xx + i) // 3) % 2) * 200
            Image.fromarray((img + rng.integers(0, 30, img.shape)).astype(np.uint8)).save(folder / name / f"{i}.png")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    _images(root / "images")
    cfg = {
        "name": "tiny",
        "seed": 3,
        # one U-Net stage: what is checked here does not depend on the depth, and every train.py / sample.py
        # process compiles the network (graph mode), ~4 s less per process than with two stages
        "model": {"type": "unet", "dim": 8, "dim_mults": [1], "channels": 1, "num_classes": 2,
                  "cond_drop_prob": 0.2},
        "diffusion": {"type": "gaussian", "image_size": 16, "timesteps": 50, "sampling_timesteps": 5,
                      "objective": "pred_v", "beta_schedule": "cosine", "offset_noise_strength": 0.1},
        "data": {"name": "image_folder", "data_dir": str(root / "images"), "random_flip": True, "num_workers": 1},
        "train": {"num_steps": STEPS, "batch_size": 4, "lr": 1e-3, "lr_schedule": "cosine", "warmup_steps": 3,
                  "save_every": SAVE_EVERY, "keep_last": 5, "log_every": 1, "sample_every": 0, "num_samples": 0,
                  "export_safetensors": True, "progress": False, "ema_update_after_step": 2, "ema_update_every": 1,
                  "ema_decay": 0.9},
        "sample": {"num": 4, "steps": 3},
    }
    (root / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    return root


class _Started:
    """``python ARGS`` started now, in the background (output to files, so no pipe can fill up), and waited for
    where its result is needed: independent runs overlap, one per core."""

    def __init__(self, args, cwd: Path):
        self.args = [str(a) for a in args]
        logs = Path(cwd) / "logs"
        logs.mkdir(exist_ok=True)
        fd, name = tempfile.mkstemp(dir=logs, prefix=Path(self.args[0]).stem + "_")
        os.close(fd)
        self.out, self.err = Path(name + ".out"), Path(name + ".err")
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.popen = subprocess.Popen([sys.executable] + self.args, cwd=cwd, stdout=out, stderr=err)
        self.result: Optional[subprocess.CompletedProcess] = None

    def wait(self, check: bool = True) -> subprocess.CompletedProcess:
        if self.result is None:
            try:
                self.popen.wait(timeout=600)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
                raise AssertionError(f"{self.args} hung:\n{self.err.read_text()}")
            self.result = subprocess.CompletedProcess(self.args, self.popen.returncode, self.out.read_text(),
                                                      self.err.read_text())
        proc = self.result
        if check and proc.returncode != 0:
            raise AssertionError(f"{self.args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


def _run(args, cwd, check=True):
    return _Started(args, cwd).wait(check)


@pytest.fixture(scope="module")
def uninterrupted(workdir):
    """The uninterrupted run's folder, as ``uninterrupted()``: started at once, it runs beside the killed one."""
    run = _Started([ROOT / "train.py", "--config", workdir / "tiny.yaml", "--out-dir", workdir / "full"], workdir)

    def folder() -> Path:
        proc = run.wait()
        done = [line for line in proc.stdout.splitlines() if line.startswith(f"done: step {STEPS},")]
        assert len(done) == 1 and re.search(r"peak RSS \d+\.\d GB;", done[0]), proc.stdout  # README quotes this line
        return workdir / "full"
    yield folder
    run.stop()


@pytest.mark.slow
def test_kill_and_resume_reaches_the_same_weights(workdir, uninterrupted):
    out = workdir / "killed"
    stopping = workdir / "stopping_train.py"
    stopping.write_text(_STOPPING_TRAIN.format(root=str(ROOT), stop_at=STOP_AT))
    proc = subprocess.Popen([sys.executable, str(stopping), "--config", str(workdir / "tiny.yaml"),
                             "--out-dir", str(out)], cwd=workdir, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    guard = threading.Timer(HANG_GUARD_S, proc.kill)   # a hang fails the test instead of blocking the suite
    guard.start()
    try:
        _, status = os.waitpid(proc.pid, os.WUNTRACED)  # returns when the run stops itself (or ends)
    finally:
        guard.cancel()
    if not os.WIFSTOPPED(status):
        proc.returncode = os.waitstatus_to_exitcode(status)   # already reaped by waitpid
        raise AssertionError(f"train.py ended (exit {proc.returncode}) instead of stopping at step {STOP_AT}"
                             + (f" (killed by the {HANG_GUARD_S} s hang guard?)" if proc.returncode < 0 else ""))
    os.kill(proc.pid, signal.SIGKILL)                  # a real kill, mid-run, of the stopped process
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    logged = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert logged == list(range(1, STOP_AT + 1))       # killed after step STOP_AT ...
    steps = [s for s, _ in list_checkpoints(out / "checkpoints")]
    assert steps == [SAVE_EVERY], f"the run was not interrupted mid-way: {steps}"   # ... with SAVE_EVERY saved
    assert not any(p.name.startswith(".") for p in (out / "checkpoints").iterdir())   # no torn temporaries

    resumed = _run([ROOT / "train.py", "--config", workdir / "tiny.yaml", "--out-dir", out, "--resume"], workdir)
    assert "resumed from" in resumed.stdout and f"at step {SAVE_EVERY}" in resumed.stdout

    a, meta_a = load_checkpoint(latest_checkpoint(uninterrupted() / "checkpoints"))
    b, meta_b = load_checkpoint(latest_checkpoint(out / "checkpoints"))
    assert meta_a["step"] == meta_b["step"] == STEPS
    assert set(a) == set(b)
    assert any(k.startswith("optimizer.moment1") for k in a) and any(k.startswith("ema.") for k in a)
    for key in sorted(a):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert meta_a["rng"] == meta_b["rng"] and meta_a["epoch"] == meta_b["epoch"]
    assert meta_a["batch_in_epoch"] == meta_b["batch_in_epoch"]


@pytest.mark.slow
def test_run_folder_contents(uninterrupted):
    uninterrupted = uninterrupted()
    for name in ("config.yaml", "log.jsonl", "loss.png", "model.safetensors"):
        assert (uninterrupted / name).is_file(), name
    lines = (uninterrupted / "log.jsonl").read_text().splitlines()
    assert len(lines) == STEPS
    rec = json.loads(lines[-1])
    assert rec["step"] == STEPS and np.isfinite(rec["loss"]) and rec["img_per_s"] > 0 and "lr" in rec


@pytest.mark.slow
def test_sample_cli_outputs(workdir, uninterrupted):
    uninterrupted, out = uninterrupted(), workdir / "samples"
    first = _Started([ROOT / "sample.py", "--ckpt", uninterrupted, "--num", 4, "--steps", 3, "--class", 1,
                      "--guidance-scale", 2.0, "--out", out / "grid.png", "--gif", out / "anim.gif", "--npz",
                      out / "raw.npz", "--seed", 5, "--no-progress"], workdir)
    again = _Started([ROOT / "sample.py", "--ckpt", uninterrupted / "model.safetensors", "--num", 4, "--steps", 3,
                      "--class", 1, "--guidance-scale", 2.0, "--out", out / "grid2.png", "--npz", out / "raw2.npz",
                      "--seed", 5, "--sampler", "dpmpp", "--option", "order=2", "--no-progress"], workdir)
    proc = first.wait()
    assert "4 images from" in proc.stdout
    assert Image.open(out / "grid.png").size[0] > 0 and Image.open(out / "anim.gif").n_frames >= 2
    raw = np.load(out / "raw.npz")
    assert raw["images"].shape == (4, 1, 16, 16) and raw["images"].min() >= 0 and raw["images"].max() <= 1
    assert raw["classes"].tolist() == [1, 1, 1, 1]
    again.wait()
    assert np.load(out / "raw2.npz")["images"].shape == (4, 1, 16, 16)


USER_ERRORS = [
    (["train.py", "--set", "train.lrr=1"], 2, "unknown key 'train.lrr' — did you mean 'lr'?"),
    (["train.py", "--config", "missing.yaml"], 2, "not found"),
    (["train.py", "--steps", "x"], 2, "invalid int value"),
    (["sample.py", "--ckpt", "nowhere"], 2, "checkpoint 'nowhere' does not exist"),
]


@pytest.fixture(scope="module")
def user_error_runs(workdir):
    """The commands of test_user_errors_are_one_line, all started together (each is mostly start-up)."""
    runs = {tuple(args): _Started([ROOT / args[0]] + args[1:], workdir) for args, _, _ in USER_ERRORS}
    yield runs
    for run in runs.values():
        run.stop()


@pytest.mark.parametrize("args,rc,message", USER_ERRORS)
def test_user_errors_are_one_line(user_error_runs, args, rc, message):
    proc = user_error_runs[tuple(args)].wait(check=False)
    assert proc.returncode == rc, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if "WARNING" not in l and l.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr


@pytest.mark.slow
def test_resume_into_a_different_model_bad_class_and_prompts_are_clear_errors(workdir, uninterrupted):
    uninterrupted = uninterrupted()
    resume = _Started([ROOT / "train.py", "--config", workdir / "tiny.yaml", "--out-dir", uninterrupted, "--resume",
                       "--set", "model.dim=16"], workdir)
    sample = _Started([ROOT / "sample.py", "--ckpt", uninterrupted, "--class", 7], workdir)
    prompted = {script: _Started([ROOT / script, "--ckpt", uninterrupted, "--prompt", "a cat"], workdir)
                for script in ("sample.py", "evaluate.py")}
    proc = resume.wait(check=False)
    assert proc.returncode == 2 and "does not match this model/config" in proc.stderr.strip().splitlines()[-1]
    proc = sample.wait(check=False)
    assert proc.returncode == 2 and "--class must lie in [0, 1]" in proc.stderr
    for script, run in prompted.items():     # a class-conditional model takes no text
        proc = run.wait(check=False)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(f"{script}: error: --prompt")
        assert "this checkpoint's model takes no text" in proc.stderr, proc.stderr
