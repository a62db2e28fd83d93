"""Runs that cannot be lost (issue 20, items 3-5), through train.py / sample.py in subprocesses on a tiny config:

* Ctrl-C (SIGINT to the process group, as a terminal sends it) or SIGTERM finishes the step, saves it,
  says how to resume and exits 130 / 143; a second Ctrl-C aborts at once; the resumed run reaches the
  uninterrupted run's weights bit for bit and its log.jsonl holds each step once;
* a diverged run (lr 1e3) stops with exit 3 and leaves the last good checkpoint as the newest;
  sample.py refuses NaN weights and warns about constant images;
* a truncated newest checkpoint: resume and sampling fall back to the newest file that reads, and say so.

Every wait is for an event (a log.jsonl line, a message, the process's exit), polled every 50 ms under a
generous guard: no outcome depends on how long anything takes. Independent runs overlap (two at a time).
Before this change every test here failed: exit -15 on SIGINT / SIGTERM, exit 0 on divergence, NaN weights
sampled, no warning, duplicated log lines, and a truncated checkpoint an error.
"""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from ms_diffusion.io.checkpoint import (export_safetensors, latest_checkpoint, list_checkpoints,
                                              load_checkpoint, load_safetensors)

pytestmark = pytest.mark.slow   # a dozen small training runs in subprocesses (~1-2 min on 2 cores)

ROOT = Path(__file__).resolve().parent.parent
TRAIN, SAMPLE = ROOT / "train.py", ROOT / "sample.py"
STEPS, SAVE_EVERY = 12, 4
GUARD_S = 600          # only a hung process takes this long (a whole run: well under a minute)

# train.py itself (its signal mask and imports, via runpy), with a save that never returns once a stop signal
# came: only an abort can end the run then, so the second Ctrl-C is seen to abort, whatever the machine's speed.
_HANGING_SAVE = """
import runpy, sys, threading
sys.argv[0] = {train!r}
sys.path.insert(0, {root!r})    # this checkout's ms_diffusion, as for train.py itself
train = runpy.run_path({train!r}, run_name="train_py")
from ms_diffusion.training.base import TrainerBase
try:
    from ms_diffusion.training.interrupt import _WATCHER
except ImportError:          # code without stop handling: the save is left alone
    _WATCHER = None
_save = TrainerBase.save
def save(self):
    if _WATCHER is not None and _WATCHER.signum is not None:
        threading.Event().wait()
    return _save(self)
TrainerBase.save = save
sys.exit(train["main"]())
"""


def _images(folder: Path, n: int = 12, size: int = 16):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    for label, name in enumerate(("circles", "stripes")):
        (folder / name).mkdir(parents=True)
        for i in range(n):
            img = (((yy - 8) ** 2 + (xx - 8) ** 2 < rng.uniform(9, 49)) * 220 if label == 0
                   else (((xx + i) // 3) % 2) * 200)
            Image.fromarray((img + rng.integers(0, 30, img.shape)).astype(np.uint8)).save(folder / name / f"{i}.png")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupts")
    _images(root / "images")
    data = {"name": "image_folder", "data_dir": str(root / "images"), "random_flip": True, "num_workers": 1}
    train = {"num_steps": STEPS, "batch_size": 4, "lr": 1e-3, "log_every": 1, "save_every": SAVE_EVERY,
             "keep_last": 5, "sample_every": 0, "num_samples": 0, "progress": False}
    (root / "tiny.yaml").write_text(yaml.safe_dump({
        "name": "tiny", "seed": 3, "data": data,
        "model": {"type": "unet", "dim": 8, "dim_mults": [1], "channels": 1},
        "diffusion": {"type": "gaussian", "image_size": 16, "timesteps": 50, "sampling_timesteps": 3,
                      "objective": "pred_v", "offset_noise_strength": 0.1},
        "train": dict(train, lr_schedule="cosine", warmup_steps=2, ema_update_after_step=2, ema_update_every=1,
                      ema_decay=0.9),
        "sample": {"num": 4, "steps": 3}}))
    (root / "ae.yaml").write_text(yaml.safe_dump({
        "name": "tiny_ae", "seed": 1, "data": data,
        "model": {"type": "autoencoder_kl", "embed_dim": 4,
                  "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 16, "in_channels": 1, "out_ch": 1,
                               "ch": 32, "ch_mult": [1], "num_res_blocks": 1, "attn_resolutions": [],
                               "dropout": 0.0}},
        "loss": {"type": "lpips_discriminator", "disc_start": 1000, "kl_weight": 1.0e-6, "disc_in_channels": 1,
                 "disc_num_layers": 1, "disc_ndf": 16, "perceptual_weight": 0.0},
        "train": dict(train, save_every=1000, adam_betas=[0.5, 0.9], clip_grad_norm=None)}))
    return root


def _default_sigint():
    """In the child: SIGINT as in a terminal's foreground job, even when these tests run as a background job
    (which inherits SIGINT ignored, and train.py keeps an ignored signal ignored, as Python does)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class _Proc:
    """A command in its own process group (a terminal's foreground job), output to files."""

    def __init__(self, args, cwd: Path, name: str):
        self.out, self.err = cwd / f"{name}.out", cwd / f"{name}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.popen = subprocess.Popen([sys.executable] + [str(a) for a in args], cwd=cwd, stdout=out,
                                          stderr=err, start_new_session=True, preexec_fn=_default_sigint)
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def stderr(self) -> str:
        return self.err.read_text()

    def wait_until(self, what: str, ready) -> bool:
        """Poll ``ready()`` until it holds (True) or the process ends (False); fails after GUARD_S."""
        while time.monotonic() - self.started < GUARD_S:
            if ready():
                return True
            if not self.running():
                return bool(ready())
            time.sleep(0.05)
        self.popen.kill()
        raise AssertionError(f"no {what} within {GUARD_S} s:\n{self.stderr()}")

    def wait_for_step(self, log: Path, step: int) -> None:
        if not self.wait_until(f"log line for step {step}", lambda: _logged_steps(log)[-1:] >= [step]):
            raise AssertionError(f"the run ended (exit {self.popen.returncode}) before step {step}:\n{self.stderr()}")

    def finish(self):
        try:
            rc = self.popen.wait(timeout=max(1.0, GUARD_S - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self.popen.kill()
            raise AssertionError(f"hung:\n{self.stderr()}")
        return rc, self.out.read_text(), self.stderr()


def _run(args, cwd: Path, name: str):
    return _Proc(args, cwd, name).finish()


def _logged_steps(log: Path, key: str = "loss"):
    if not log.is_file():
        return []
    steps = []
    for line in log.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue   # a line being written
        if key in rec:
            steps.append(rec["step"])
    return steps


def _lines(text: str):
    return [line for line in text.splitlines() if line.strip() and "WARNING" not in line]


def _assert_same_state(expected: Path, got: Path, step: int = STEPS) -> None:
    """The step-``step`` checkpoints of two runs hold the same training state, bit for bit."""
    name = f"step_{step:08d}.ckpt"
    a, meta_a = load_checkpoint(expected / "checkpoints" / name)
    b, meta_b = load_checkpoint(got / "checkpoints" / name)
    assert meta_a["step"] == meta_b["step"] == step and set(a) == set(b)
    assert any(k.startswith("optimizer.") for k in a) and any(k.startswith("ema.") for k in a)
    for key in sorted(a):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert (meta_a["rng"], meta_a["epoch"], meta_a["batch_in_epoch"]) == \
        (meta_b["rng"], meta_b["epoch"], meta_b["batch_in_epoch"])


@pytest.fixture(scope="module")
def reference(workdir):
    """The uninterrupted run, saving every step; started at once and waited for where it is needed (it runs
    beside the interrupted one)."""
    proc = _Proc([TRAIN, "--config", workdir / "tiny.yaml", "--out-dir", workdir / "full", "--set",
                  "train.save_every=1", "--set", "train.keep_last=0"], workdir, "full")

    def folder() -> Path:
        rc, out, err = proc.finish()
        assert rc == 0, err
        return workdir / "full"
    return folder


def test_ctrl_c_finishes_the_step_and_saves_it(workdir, reference):
    """Was: SIGINT ended train.py within 0.06 s with exit -15 (MindSpore's runtime threads turn SIGINT into
    SIGTERM), no message, the steps since the last checkpoint lost. The checkpoint written on the way out holds
    exactly the uninterrupted run's state at that step (weights, EMA, moments, RNG, data position): resuming
    it is resuming any checkpoint (test_resume_drops_the_log_lines_of_lost_steps checks that end to end)."""
    out = workdir / "ctrl_c"
    proc = _Proc([TRAIN, "--config", workdir / "tiny.yaml", "--out-dir", out], workdir, "ctrl_c")
    proc.wait_for_step(out / "log.jsonl", 2)     # past start-up and compilation, mid-run
    os.killpg(proc.pid, signal.SIGINT)           # what Ctrl-C in a terminal does
    rc, _, err = proc.finish()
    assert rc == 130, f"exit {rc}:\n{err}"
    lines = _lines(err)
    assert "SIGINT received: finishing this step, then saving a checkpoint" in lines[0], err
    stopped = [line for line in lines if line.startswith("train.py: stopped by SIGINT at step ")]
    assert len(stopped) == 1, err
    step = int(stopped[0].split(" at step ")[1].split(";")[0])
    assert 2 <= step < STEPS, "the run was not stopped mid-way"
    ckpt = out / "checkpoints" / f"step_{step:08d}.ckpt"
    assert stopped[0].endswith(f"checkpoint {ckpt}") and latest_checkpoint(out / "checkpoints") == ckpt
    assert load_checkpoint(ckpt)[1]["step"] == step
    assert _logged_steps(out / "log.jsonl") == list(range(1, step + 1))
    assert _logged_steps(out / "log.jsonl", "event") == [step]
    assert not any(p.name.startswith(".") for p in (out / "checkpoints").iterdir())   # no temporaries

    command = _resume_command(err)
    assert command[1:] == [str(TRAIN), "--config", str(workdir / "tiny.yaml"), "--out-dir", str(out), "--resume"]
    _assert_same_state(reference(), out, step)


def _resume_command(err: str):
    """The command a stopped run printed (``python train.py ... --resume``), as an argument list."""
    lines = [line for line in err.splitlines() if line.startswith("train.py: resume ")]
    assert len(lines) == 1, err
    command = shlex.split(lines[0].split(" with: ", 1)[1])
    assert command[0] == "python" and command[-1] == "--resume", lines[0]
    return command


@pytest.fixture(scope="module")
def aborted(workdir, diverged_run):  # diverged_run: requested to run beside this one
    """A run given Ctrl-C twice after step SAVE_EVERY + 2 (its save after the first one never ends)."""
    out = workdir / "aborted"
    (workdir / "hanging_save.py").write_text(_HANGING_SAVE.format(train=str(TRAIN), root=str(ROOT)))
    proc = _Proc([workdir / "hanging_save.py", "--config", workdir / "tiny.yaml", "--out-dir", out], workdir,
                 "aborted")
    proc.wait_for_step(out / "log.jsonl", SAVE_EVERY + 2)
    os.killpg(proc.pid, signal.SIGINT)
    if proc.wait_until("message after the first Ctrl-C", lambda: "received: finishing" in proc.stderr()):
        os.killpg(proc.pid, signal.SIGINT)
        second = time.monotonic()
    rc, _, err = proc.finish()
    return out, rc, err, time.monotonic() - second if rc == 130 else None


def test_second_ctrl_c_aborts_at_once(workdir, aborted):
    """Was: there was no first Ctrl-C to follow (the first one killed the run)."""
    out, rc, err, seconds = aborted
    assert rc == 130, f"exit {rc}:\n{err}"
    assert "train.py: SIGINT again: aborted at once, without saving" in err
    assert _resume_command(err)[1:] == [str(TRAIN), "--config", str(workdir / "tiny.yaml"), "--out-dir", str(out),
                                        "--resume"]
    print(f"aborted {seconds:.2f} s after the second Ctrl-C")
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [SAVE_EVERY]
    assert not any(p.name.startswith(".") for p in (out / "checkpoints").iterdir())


def test_resume_drops_the_log_lines_of_lost_steps(workdir, reference, aborted, truncated_resume):  # (runs beside)
    """Was: after an abrupt end and --resume, log.jsonl kept the lines of the lost steps (5, 6, 5, 6, ...)."""
    out = aborted[0]
    lost = [s for s in _logged_steps(out / "log.jsonl") if s > SAVE_EVERY]
    assert lost, "the aborted run logged no step past its checkpoint"
    rc, stdout, err = _run([TRAIN, "--config", workdir / "tiny.yaml", "--out-dir", out, "--resume"], workdir,
                           "aborted_resumed")
    assert rc == 0, err
    assert f"resumed from {out / 'checkpoints' / f'step_{SAVE_EVERY:08d}.ckpt'} at step {SAVE_EVERY}" in stdout
    assert _logged_steps(out / "log.jsonl") == list(range(1, STEPS + 1))
    assert f"log.jsonl: dropped {len(lost)} line(s) past step {SAVE_EVERY}" in stdout
    _assert_same_state(reference(), out)


def test_sigterm_stops_the_autoencoder_after_its_step_with_a_checkpoint(workdir, sampled):  # sampled: runs beside
    """Was: SIGTERM (a scheduler's stop) killed train.py at once, exit -15, nothing saved."""
    out = workdir / "ae"
    proc = _Proc([TRAIN, "--config", workdir / "ae.yaml", "--out-dir", out], workdir, "ae")
    proc.wait_for_step(out / "log.jsonl", 2)
    os.kill(proc.pid, signal.SIGTERM)            # to the process only, as `kill PID` / a batch system
    rc, _, err = proc.finish()
    assert rc == 143, f"exit {rc}:\n{err}"
    stopped = [line for line in _lines(err) if line.startswith("train.py: stopped by SIGTERM at step ")]
    assert len(stopped) == 1, err
    step = int(stopped[0].split(" at step ")[1].split(";")[0])
    assert 2 <= step < STEPS
    (saved_step, ckpt), = list_checkpoints(out / "checkpoints")   # save_every 1000: the stop's checkpoint only
    assert saved_step == step and load_checkpoint(ckpt)[1]["step"] == step
    assert _resume_command(err)[1:] == [str(TRAIN), "--config", str(workdir / "ae.yaml"), "--out-dir", str(out),
                                        "--resume"]


@pytest.fixture(scope="module")
def diverged_run(workdir):
    """lr 1e3 for up to 30 steps (the default max_bad_steps is 20), started at once, waited for by its test."""
    out = workdir / "diverged"
    proc = _Proc([TRAIN, "--config", workdir / "tiny.yaml", "--out-dir", out, "--steps", 30,
                  "--set", "train.lr=1e3", "--set", "train.save_every=1"], workdir, "diverged")
    return out, proc


def test_diverged_run_stops_and_keeps_the_last_good_checkpoint(diverged_run):
    """Was: with lr 1e3 the loss is inf from step 2, every update is skipped, and the run goes on to exit 0,
    saving the diverged state."""
    out, proc = diverged_run
    rc, _, err = proc.finish()
    assert rc == 3, f"exit {rc}:\n{err}"
    (line,) = _lines(err)
    assert line.startswith("train.py: error: training diverged: all 20 updates of steps ") and \
        "train.max_bad_steps=20" in line and "Lower train.lr (now 1000)" in line, line
    records = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    finite = [r["step"] for r in records if "loss" in r and np.isfinite(r["loss"])]
    assert records[-1]["event"] == "diverged" and records[-1]["step"] == finite[-1] + 20 < 30
    steps = [s for s, _ in list_checkpoints(out / "checkpoints")]
    assert steps[-1] == finite[-1], steps              # the newest checkpoint is the last good step
    assert f"{out / 'checkpoints' / f'step_{steps[-1]:08d}.ckpt'} (step {steps[-1]}), is the last good state" in line
    assert not (out / "model.safetensors").exists()


def _edited_export(src: Path, dst: Path, edit) -> Path:
    arrays, meta = load_safetensors(src)
    edit(arrays)
    return export_safetensors(dst, arrays, meta)


def _poison(arrays):
    name = sorted(arrays)[0]
    arrays[name] = np.full_like(arrays[name], np.nan)


def _collapse(arrays):   # the U-Net predicts one huge value everywhere: every image clips to one colour
    arrays["model.final_conv.weight"] = np.zeros_like(arrays["model.final_conv.weight"])
    arrays["model.final_conv.bias"] = np.full_like(arrays["model.final_conv.bias"], 1e4)


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


@pytest.fixture(scope="module")
def sampled(workdir, reference):
    """sample.py on three damaged copies of the reference run, all started at once (each mostly start-up),
    waited for by their tests: weights with NaN, a collapsed network, a run folder whose newest checkpoint is
    truncated. Name -> (the damaged checkpoint, the run)."""
    full = reference()
    bad = _edited_export(full / "model.safetensors", workdir / "nan" / "model.safetensors", _poison)
    flat = _edited_export(full / "model.safetensors", workdir / "flat" / "model.safetensors", _collapse)
    truncated = workdir / "truncated_sample"
    shutil.copytree(full, truncated)
    _truncate(truncated / "checkpoints" / f"step_{STEPS:08d}.ckpt")
    return {name: (ckpt, _Proc([SAMPLE, "--ckpt", ckpt, "--out", out / "grid.png", "--no-progress"], workdir, name))
            for name, ckpt, out in (("nan", bad, workdir / "nan"), ("flat", flat, workdir / "flat"),
                                    ("truncated_sample", truncated, truncated))}


def test_sample_refuses_non_finite_weights(workdir, sampled):
    """Was: sample.py sampled NaN weights and wrote black images, exit 0."""
    bad, proc = sampled["nan"]
    rc, _, err = proc.finish()
    assert rc == 2, err
    (line,) = _lines(err)
    assert line.startswith(f"sample.py: error: {bad}: ") and "are NaN or infinite" in line, line
    assert not (workdir / "nan" / "grid.png").exists()


def test_sample_warns_when_every_image_is_constant(sampled):
    """Was: a model whose output ignores its input (collapsed) gave flat grey/black grids without a word."""
    flat, proc = sampled["flat"]
    rc, out, err = proc.finish()
    assert rc == 0, err
    warning = [line for line in _lines(err) if line.startswith("sample.py: warning: ")]
    assert len(warning) == 1 and "all 4 images are constant" in warning[0] and str(flat) in warning[0], err


@pytest.fixture(scope="module")
def truncated_resume(workdir, reference):
    """--resume in a folder whose newest checkpoint is truncated, started at once, waited for by its test."""
    full, out = reference(), workdir / "truncated_resume"
    (out / "checkpoints").mkdir(parents=True)
    for step in (SAVE_EVERY, 2 * SAVE_EVERY):          # what a run killed at step 2 * SAVE_EVERY holds ...
        name = f"step_{step:08d}.ckpt"
        shutil.copy(full / "checkpoints" / name, out / "checkpoints" / name)
    log = (full / "log.jsonl").read_text().splitlines()[:2 * SAVE_EVERY]
    (out / "log.jsonl").write_text("\n".join(log) + "\n")
    shutil.copy(full / "config.yaml", out / "config.yaml")
    bad = out / "checkpoints" / f"step_{2 * SAVE_EVERY:08d}.ckpt"
    _truncate(bad)                                     # ... with its newest checkpoint cut short (disk full)
    proc = _Proc([TRAIN, "--config", workdir / "tiny.yaml", "--out-dir", out, "--resume"], workdir,
                 "truncated_resume")
    return full, out, bad, proc


def test_resume_falls_back_from_a_truncated_newest_checkpoint(truncated_resume):
    """Was: a truncated newest checkpoint made --resume fail although the one before it was intact."""
    full, out, bad, proc = truncated_resume
    rc, stdout, err = proc.finish()
    assert rc == 0, err
    good = out / "checkpoints" / f"step_{SAVE_EVERY:08d}.ckpt"
    assert f"{bad} is unreadable (truncated or corrupt); using {good} (step {SAVE_EVERY}) instead" in stdout
    assert f"resumed from {good} at step {SAVE_EVERY}" in stdout
    assert _logged_steps(out / "log.jsonl") == list(range(1, STEPS + 1))
    _assert_same_state(full, out)


def test_sampling_falls_back_from_a_truncated_newest_checkpoint(sampled):
    """Was: sample.py on a run folder whose newest checkpoint is truncated failed although model.safetensors
    (same step) and the older checkpoints were intact."""
    out, proc = sampled["truncated_sample"]
    bad = out / "checkpoints" / f"step_{STEPS:08d}.ckpt"
    rc, stdout, err = proc.finish()
    assert rc == 0, err
    used = out / "model.safetensors"
    assert f"sample.py: {bad} is unreadable (truncated or corrupt); using {used} (step {STEPS}) instead" in err
    assert f"from {used} (step {STEPS}, ema weights)" in stdout and (out / "grid.png").is_file()
