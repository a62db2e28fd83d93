"""A run folder belongs to one run and is never lost (issue 20, items 1, 2 and 6).

One test per symptom: a finished run is not overwritten without --overwrite; --overwrite replaces it
and keeps other files; a second train.py on a busy folder is refused at once, naming the holder; the
lock of a kill -9'd run does not block; a refused --resume leaves config.yaml (and everything else)
byte-identical; a start that fails leaves no folder / the folder as it was; a bad .gz leaves no raw/;
a full disk while writing a checkpoint or the export is a user error naming the file, leaves no
temporary file and the previous files intact.

Locks are between processes, so the run holding the folder is a real ``train.py`` in a subprocess,
stopped (SIGSTOP) once it owns the folder; the other runs go through ``ms_diffusion.cli.train.main``
in this process (the folder checks are the same; no interpreter start-up). The finished run that most
tests start from is written by a Trainer without training (the same files train.py leaves).
"""
import errno
import gzip
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from ms_diffusion.io.checkpoint import list_checkpoints, load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SIZE, N_IMAGES, BATCH = 16, 12, 4
HANG_GUARD_S = 180                 # only a hung process takes this long
_ENV = dict(os.environ, GLOG_v="3")  # MindSpore: errors only

# train.py that stops itself (SIGSTOP) when it is about to train: it owns the run folder by then
_STOP_BEFORE_FIT = """
import os, signal, sys
sys.path.insert(0, {root!r})
import ms_diffusion  # CPU workaround first, as train.py
from ms_diffusion.cli.train import main
from ms_diffusion.training.trainer import Trainer

_fit = Trainer.fit
def _stop_then_fit(self, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGSTOP)
    return _fit(self, *args, **kwargs)
Trainer.fit = _stop_then_fit
sys.exit(main())
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runfolder")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    for i in range(N_IMAGES):
        Image.fromarray(rng.integers(0, 255, (SIZE, SIZE)).astype(np.uint8)).save(root / "images" / f"{i:02d}.png")
    cfg = {
        "name": "tiny", "seed": 3, "mode": "pynative",   # a step or two: no graph compile
        "model": {"type": "unet", "dim": 8, "dim_mults": [1, 2], "channels": 1},
        "diffusion": {"type": "gaussian", "image_size": SIZE, "timesteps": 20, "sampling_timesteps": 2,
                      "objective": "pred_v", "beta_schedule": "cosine"},
        "data": {"name": "image_folder", "data_dir": str(root / "images"), "num_workers": 1},
        "train": {"num_steps": 2, "batch_size": BATCH, "lr": 1e-3, "save_every": 1, "keep_last": 5,
                  "log_every": 1, "sample_every": 0, "num_samples": 0, "export_safetensors": True,
                  "progress": False},
    }
    (root / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    return root


@pytest.fixture(scope="module")
def finished(workdir) -> Path:
    """A run folder as a finished 2-step train.py run leaves it (checkpoints at steps 1 and 2, export, log)."""
    from ms_diffusion import runtime
    from ms_diffusion.config import load_config
    from ms_diffusion.experiment import build_data_source, build_diffusion
    from ms_diffusion.training import Trainer

    cfg = load_config(str(workdir / "tiny.yaml"), [f"out_dir={workdir / 'finished'}"])
    runtime.seed_everything(cfg.seed)
    diffusion, ema = build_diffusion(cfg), build_diffusion(cfg)
    trainer = Trainer(diffusion, ema, build_data_source(cfg, diffusion), cfg.train, cfg.run_dir,
                      meta={"config": cfg.to_dict()}, seed=cfg.seed, log=lambda *_: None)
    cfg.run_dir.mkdir()
    (cfg.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    for step in (1, 2):
        trainer.step = step
        trainer.save()
        with open(cfg.run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "loss": 0.5}) + "\n")
    trainer._export(cfg.run_dir / "model.safetensors")
    return cfg.run_dir


def _copy(finished: Path, dest: Path) -> Path:
    shutil.copytree(finished, dest)
    return dest


def _snapshot(folder: Path):
    """Every file and folder under ``folder`` (dot-files included) with its bytes."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def _train(capsys, workdir: Path, out: Path, *args):
    """train.py in this process: (exit code, stdout, stderr)."""
    from ms_diffusion.cli.train import main

    capsys.readouterr()
    rc = main(["--config", str(workdir / "tiny.yaml"), "--out-dir", str(out), *map(str, args)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _error_lines(err: str):
    """stderr without MindSpore's own log lines."""
    return [line for line in err.strip().splitlines() if line.strip() and not line.startswith("[")]


def _start_owner(workdir: Path, out: Path, *args) -> subprocess.Popen:
    """train.py on ``out``, stopped once it owns the folder (just before its first update)."""
    script = workdir / "stop_before_fit.py"
    script.write_text(_STOP_BEFORE_FIT.format(root=str(ROOT)))
    log = out.with_name(out.name + ".owner.log")   # a file, not a pipe: nobody reads it while the run goes on
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(script), "--config", str(workdir / "tiny.yaml"), "--out-dir",
                                 str(out), *map(str, args)], cwd=workdir, stdout=f, stderr=subprocess.STDOUT,
                                env=_ENV)
    guard = threading.Timer(HANG_GUARD_S, proc.kill)
    guard.start()
    try:
        _, status = os.waitpid(proc.pid, os.WUNTRACED)
    finally:
        guard.cancel()
    if not os.WIFSTOPPED(status):
        proc.returncode = os.waitstatus_to_exitcode(status)
        raise AssertionError(f"train.py ended (exit {proc.returncode}) instead of stopping before training:\n"
                             f"{log.read_text()[-3000:]}")
    return proc


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


# ---------------------------------------------------------------------- 1. no silent overwrite

def test_new_run_in_a_folder_holding_a_finished_run_is_refused(workdir, finished, tmp_path, capsys):
    run = _copy(finished, tmp_path / "run")
    before = _snapshot(run)
    rc, out, err = _train(capsys, workdir, run, "--seed", 7)
    lines = _error_lines(err)
    assert rc == 2 and len(lines) == 1, err
    assert "already holds a run (2 checkpoint(s) up to step 2, model.safetensors, log.jsonl)" in lines[0]
    assert all(fix in lines[0] for fix in ("--resume", "fresh --out-dir", "--overwrite"))
    assert "run folder:" not in out                        # refused before the model was built
    assert _snapshot(run) == before                        # nothing touched


def test_overwrite_replaces_the_previous_run_and_keeps_other_files(workdir, finished, tmp_path, capsys):
    run = _copy(finished, tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    rc, _, err = _train(capsys, workdir, run, "--overwrite", "--resume")
    assert rc == 2 and "cannot be combined with --resume" in err

    rc, out, err = _train(capsys, workdir, run, "--overwrite", "--steps", 1)
    assert rc == 0, err
    assert "--overwrite: deleted the previous run" in out and "2 checkpoint(s)" in out
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [1]   # step 2 was the old run's
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [1]
    assert load_checkpoint(run / "checkpoints" / "step_00000001.ckpt")[1]["batch_size"] == BATCH
    assert (run / "notes.txt").read_text() == "mine"       # not a run file: kept
    assert not (run / ".lock").exists()


# ---------------------------------------------------------------------- 2. one run per folder

def test_second_run_on_a_busy_folder_is_refused_naming_the_holder(workdir, finished, tmp_path):
    run = _copy(finished, tmp_path / "run")
    owner = _start_owner(workdir, run, "--resume", "--steps", 3)
    try:
        before = _snapshot(run)
        second = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(workdir / "tiny.yaml"),
                                 "--out-dir", str(run), "--resume"], cwd=workdir, capture_output=True, text=True,
                                timeout=HANG_GUARD_S, env=_ENV)
        lines = _error_lines(second.stderr)
        assert second.returncode == 2 and len(lines) == 1, second.stderr
        assert f"run folder {run} is in use by another training run (pid {owner.pid} on host " \
               f"{socket.gethostname()}" in lines[0]
        assert "run folder:" not in second.stdout           # refused before building anything
        assert _snapshot(run) == before                      # and without touching the folder
        owner_info = json.loads((run / ".lock").read_text())  # what the message is made of
        assert owner_info["pid"] == owner.pid and owner_info["host"] == socket.gethostname()
        assert "--resume" in owner_info["command"] and owner_info["started"] > 0
    finally:
        _kill(owner)


def test_lock_left_by_a_killed_run_does_not_block(workdir, finished, tmp_path, capsys):
    run = _copy(finished, tmp_path / "run")
    owner = _start_owner(workdir, run, "--resume", "--steps", 3)
    _kill(owner)                                             # kill -9 while it owns the folder
    assert json.loads((run / ".lock").read_text())["pid"] == owner.pid   # its lock file stays behind
    rc, out, err = _train(capsys, workdir, run, "--resume")  # the checkpoint is at num_steps: nothing to train
    assert rc == 0, err
    assert f"taking over the lock of a run that ended without releasing it (pid {owner.pid} on host" in out
    assert "resumed from" in out and not (run / ".lock").exists()


# ---------------------------------------------------------------------- 6. nothing written before validation

def test_refused_resume_leaves_config_and_folder_byte_identical(workdir, finished, tmp_path, capsys):
    run = _copy(finished, tmp_path / "run")
    before = _snapshot(run)
    rc, _, err = _train(capsys, workdir, run, "--resume", "--set", "model.dim=16")
    assert rc == 2 and "does not match this model/config" in _error_lines(err)[-1], err
    assert _snapshot(run) == before                          # config.yaml still the run's own, no .lock


def test_failed_start_leaves_no_folder_or_the_folder_as_it_was(workdir, tmp_path, capsys, monkeypatch):
    from ms_diffusion.training.step import TrainStep

    # a resume checkpoint that does not exist: refused after the folder was claimed, before anything is written
    rc, _, err = _train(capsys, workdir, tmp_path / "missing", "--resume", tmp_path / "nowhere.ckpt")
    assert rc == 2 and "does not exist" in err, err
    assert not (tmp_path / "missing").exists()

    # a failure in the first update, once the run owns the folder and has written config.yaml
    def failing_step(self, *inputs):
        raise RuntimeError("simulated failure in the first update")

    monkeypatch.setattr(TrainStep, "__call__", failing_step)
    rc, out, err = _train(capsys, workdir, tmp_path / "new" / "run")
    assert rc == 1 and "simulated failure in the first update" in err and "run folder:" in out, err
    assert not (tmp_path / "new").exists()                   # both folders it created are gone

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    rc, _, err = _train(capsys, workdir, mine)
    assert rc == 1, err
    assert _snapshot(mine) == {"notes.txt": b"mine"}         # the folder as it was


def test_bad_gz_leaves_no_raw_folder(tmp_path):
    from ms_diffusion.data.fashion_mnist import locate_fashion_mnist
    from ms_diffusion.data.source import BadDataError

    data = tmp_path / "fm"
    data.mkdir()
    with gzip.open(data / "train-images-idx3-ubyte.gz", "wb") as f:   # a good file ...
        f.write(struct.pack(">IIII", 2051, 2, 28, 28) + bytes(2 * 28 * 28))
    (data / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")   # ... and a bad one
    before = _snapshot(data)
    with pytest.raises(BadDataError, match="train-labels-idx1-ubyte.gz is not a valid gzip file"):
        locate_fashion_mnist(data, "train", download=False)
    assert _snapshot(data) == before                         # no raw/, no half-set of copies


class _FullDisk:
    """A file that takes ``room`` bytes, then fails as a full disk does (``OSError(ENOSPC)``, no file name)."""

    def __init__(self, f, room: int):
        self._f, self._room = f, room

    def write(self, data):
        if len(data) > self._room:
            self._f.write(bytes(data[:self._room]))
            self._room = 0
            self._f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def test_full_disk_while_writing_is_a_user_error_naming_the_file(workdir, finished, tmp_path, capsys,
                                                                   monkeypatch):
    from mindspore.train import serialization
    import safetensors
    import safetensors.numpy

    # a checkpoint: MindSpore's writer hits ENOSPC part-way through the step-3 checkpoint
    run = _copy(finished, tmp_path / "run")
    old = {name: (run / name).read_bytes() for name in ("checkpoints/step_00000002.ckpt", "model.safetensors")}
    real_open = serialization._ckpt_fs.create
    monkeypatch.setattr(serialization._ckpt_fs, "create", lambda name, mode: _FullDisk(real_open(name, mode), 4096))
    rc, _, err = _train(capsys, workdir, run, "--resume", "--steps", 3)
    monkeypatch.undo()
    lines = _error_lines(err)
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert f"cannot write {run / 'checkpoints' / 'step_00000003.ckpt'}: No space left on device" in lines[0]
    assert "the disk is full" in lines[0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001.ckpt", "step_00000002.ckpt"]
    assert {name: (run / name).read_bytes() for name in old} == old     # the previous checkpoint is intact
    assert load_checkpoint(run / "checkpoints" / "step_00000002.ckpt")[1]["step"] == 2
    assert not (run / ".lock").exists()

    # the exported weights: safetensors reports the full disk as SafetensorError("... (os error 28)")
    run = _copy(finished, tmp_path / "run2")
    old = (run / "model.safetensors").read_bytes()

    def full_disk_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.numpy, "save_file", full_disk_save_file)
    rc, _, err = _train(capsys, workdir, run, "--resume")   # at num_steps already: straight to the export
    lines = _error_lines(err)
    assert rc == 2 and len(lines) == 1, err
    assert f"cannot write {run / 'model.safetensors'}: No space left on device" in lines[0]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "log.jsonl", "model.safetensors"]
    assert (run / "model.safetensors").read_bytes() == old
