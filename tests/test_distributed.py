"""Data parallel through msrun with 2 CPU workers: replicas stay identical and equal a one-process run on
the same global batch; a killed worker fails the launcher with a clear message and the run resumes;
a single-device checkpoint resumes into 2 workers as documented (docs/distributed.md).

Every run goes through scripts/run_distribute_train.sh and the real train.py code path;
tests/distributed_worker.py only adds a dump of each rank's final state for the comparisons.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest
import yaml
from PIL import Image

from ms_diffusion.io.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = ROOT / "scripts" / "run_distribute_train.sh"
RANKTABLE = ROOT / "scripts" / "run_distribute_train_ranktable.sh"
STANDALONE = ROOT / "scripts" / "run_standalone_train.sh"
WORKER = ROOT / "tests" / "distributed_worker.py"
WORLD, BATCH, STEPS, SAVE_EVERY = 2, 4, 8, 4
N_IMAGES, SIZE = 48, 16           # 24 per rank: 6 batches of 4 per epoch, so 8 steps cross an epoch
TOL = 1e-5

needs_msrun = pytest.mark.skipif(shutil.which("msrun") is None or shutil.which("bash") is None,
                                 reason="msrun (MindSpore's launcher) is not on PATH")


# ---------------------------------------------------------------------- fixtures and helpers

def _make_images(folder: Path) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    folder.mkdir(parents=True)
    for i in range(N_IMAGES):
        if i % 2:
            r = rng.uniform(3, 7)
            img = ((yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2 < r * r) * 200
        else:
            img = (((xx + i) // 3) % 2) * 200
        Image.fromarray((img + rng.integers(0, 40, img.shape)).astype(np.uint8)).save(folder / f"{i:02d}.png")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    _make_images(root / "images")
    cfg = {
        "name": "tiny_dp", "seed": 5,
        "model": {"type": "unet", "dim": 8, "dim_mults": [1, 2], "channels": 1},
        "diffusion": {"type": "gaussian", "image_size": SIZE, "timesteps": 50, "sampling_timesteps": 5,
                      "objective": "pred_v", "beta_schedule": "cosine"},
        "data": {"name": "image_folder", "data_dir": str(root / "images"), "random_flip": True, "num_workers": 1},
        "train": {"num_steps": STEPS, "batch_size": BATCH, "lr": 1e-3, "lr_schedule": "constant",
                  "clip_grad_norm": 1.0, "save_every": SAVE_EVERY, "keep_last": 10, "log_every": 1,
                  "sample_every": 0, "num_samples": 0, "export_safetensors": False, "progress": False,
                  "ema_decay": 0.9, "ema_update_every": 1, "ema_update_after_step": 1},
    }
    (root / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    return root


def _launch_cmd(workdir: Path, out: Path, extra: Sequence[str]) -> List[str]:
    return ["bash", str(LAUNCHER), str(WORLD), str(workdir / "tiny.yaml"), "--out-dir", str(out), *map(str, extra)]


def _launch_env(log_dir: Path, dump: Optional[Path]) -> Dict[str, str]:
    env = dict(os.environ, DEVICE_TARGET="CPU", TRAIN_SCRIPT=str(WORKER), LOG_DIR=str(log_dir), GLOG_v="3")
    env.pop("MS_DIFFUSION_TEST_DUMP", None)
    if dump is not None:
        env["MS_DIFFUSION_TEST_DUMP"] = str(dump)
    return env


class _Launched:
    """The launcher with 2 CPU workers, started in the background (output to files, so no pipe fills up)."""

    def __init__(self, workdir: Path, name: str, extra: Sequence[str] = (), out: Optional[Path] = None):
        self.out = out or workdir / name
        self.log_dir, self.dump = workdir / f"{name}_logs", workdir / f"{name}_dump"
        self.stdout, self.stderr = workdir / f"{name}.stdout", workdir / f"{name}.stderr"
        with open(self.stdout, "w") as stdout, open(self.stderr, "w") as stderr:
            self.popen = subprocess.Popen(_launch_cmd(workdir, self.out, extra), cwd=workdir, stdout=stdout,
                                          stderr=stderr, env=_launch_env(self.log_dir, self.dump))

    def result(self, check: bool = True) -> Tuple[subprocess.CompletedProcess, Path, Path, Path]:
        """Wait for the launcher; returns (process, run folder, log dir, dump dir)."""
        try:
            rc = self.popen.wait(timeout=420)
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        proc = subprocess.CompletedProcess(self.popen.args, rc, self.stdout.read_text(), self.stderr.read_text())
        if check and proc.returncode != 0:
            logs = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in sorted(self.log_dir.glob("*.log")))
            raise AssertionError(f"launcher failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n{logs}")
        return proc, self.out, self.log_dir, self.dump

    def stop(self) -> None:
        """A launch still running (a failed test): Ctrl-C, which the launcher passes to msrun and its workers."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def _launch(workdir: Path, name: str, extra: Sequence[str] = (), out: Optional[Path] = None,
            check: bool = True) -> Tuple[subprocess.CompletedProcess, Path, Path, Path]:
    """Run the launcher with 2 CPU workers to completion; returns (process, run folder, log dir, dump dir)."""
    return _Launched(workdir, name, extra, out).result(check)


def _dump(dump: Path, rank: int) -> Tuple[Dict[str, np.ndarray], dict]:
    with np.load(dump / f"rank_{rank}.npz") as z:
        arrays = {k: z[k] for k in z.files if k != "__info__"}
        info = json.loads(str(z["__info__"]))
    return arrays, info


def _max_diff(a: Dict[str, np.ndarray], b: Dict[str, np.ndarray], prefix: str = "") -> float:
    keys = [k for k in a if k.startswith(prefix)]
    assert keys and set(keys) == {k for k in b if k.startswith(prefix)}
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))) if a[k].size else 0.0
               for k in keys)


def _trainer(cfg_path: Path, out_dir: Path, *, rank: int, world_size: int, batch_size: int,
             log: Callable[[str], None] = lambda *_: None):
    """The Trainer that train.py builds for ``rank`` of ``world_size`` with per-device ``batch_size``, here
    without collectives (``distributed.current()`` is a single process in pytest). Returns (trainer, config)."""
    import dataclasses

    from ms_diffusion import runtime
    from ms_diffusion.config import load_config
    from ms_diffusion.experiment import build_data_source, build_diffusion
    from ms_diffusion.training import Trainer

    cfg = load_config(str(cfg_path), [])
    runtime.seed_everything(cfg.seed)                   # what train.py's runtime.setup does before building
    diffusion, ema = build_diffusion(cfg), build_diffusion(cfg)
    source = build_data_source(cfg, diffusion, shard_id=rank, num_shards=world_size)
    trainer = Trainer(diffusion, ema, source, dataclasses.replace(cfg.train, batch_size=batch_size), out_dir,
                      seed=cfg.seed, rank=rank, world_size=world_size, log=log)
    return trainer, cfg


def _state(trainer) -> Dict[str, np.ndarray]:
    """Every checkpoint group of ``trainer`` as ``group.name`` -> array (what the worker dumps hold)."""
    return {f"{g}.{n}": p.asnumpy() for g, params in trainer._state_groups().items() for n, p in params.items()}


def _reference(cfg_path: Path, out_dir: Path, steps: int) -> Tuple[Dict[str, np.ndarray], List[dict]]:
    """One process, one step per global batch of ``WORLD * BATCH``: rank r's shard batch drawn with rank r's
    noise stream, concatenated in rank order -- what the 2 data-parallel workers compute together.
    Returns (state groups as arrays, each rank's noise-stream state at the end)."""
    from mindspore import Tensor

    from ms_diffusion.experiment import build_data_source
    from ms_diffusion.training.distributed import fresh_rng

    trainer, cfg = _trainer(cfg_path, out_dir, rank=0, world_size=1, batch_size=WORLD * BATCH)
    shards = [build_data_source(cfg, trainer.diffusion, shard_id=r, num_shards=WORLD) for r in range(WORLD)]
    rngs = [fresh_rng(cfg.seed, r) for r in range(WORLD)]
    epoch, batch = 0, 0
    for _ in range(steps):
        if batch == shards[0].batches_per_epoch(BATCH):
            epoch, batch = epoch + 1, 0
        parts = [next(iter(src.epoch(epoch, BATCH, start_batch=batch)))[0] for src in shards]
        batch += 1
        inputs = [trainer.diffusion.training_inputs(images, rng) for images, rng in zip(parts, rngs)]
        joined = {key: np.concatenate([i[key] for i in inputs]) for key in ("times", "noise")}
        trainer.step_fn(Tensor(np.concatenate(parts)), Tensor(joined["times"]), Tensor(joined["noise"]), None,
                        inputs[0]["self_cond"], None)
        trainer.ema.update()
    return _state(trainer), [g.bit_generator.state for g in rngs]


@pytest.fixture(scope="module")
def uninterrupted(workdir):
    """``uninterrupted()``: (process, run folder, log dir, dump dir) of the 8-step launch. Started at once, it
    runs beside the one-process reference (its workers spend seconds joining the cluster and leaving it)."""
    launch = _Launched(workdir, "full")
    yield launch.result
    launch.stop()


# ---------------------------------------------------------------------- helpers without msrun

def test_resume_position_counts_consumed_images():
    from ms_diffusion.training.distributed import resume_position

    same = dict(saved_batch_size=4, saved_world_size=2, batch_size=4, world_size=2, batches_per_epoch=6)
    assert resume_position(3, 5, **same) == (3, 5)
    # 1 device x batch 8 after 4 batches = 32 images = 4 batches of 2 workers x 4
    assert resume_position(0, 4, saved_batch_size=8, saved_world_size=1, batch_size=4, world_size=2,
                           batches_per_epoch=6) == (0, 4)
    # 8 workers x 2 after 3 batches = 48 images -> 2 workers x 4: 6 batches, rounded up so none repeats
    assert resume_position(1, 3, saved_batch_size=2, saved_world_size=8, batch_size=4, world_size=2,
                           batches_per_epoch=20) == (1, 6)
    assert resume_position(1, 5, saved_batch_size=3, saved_world_size=1, batch_size=4, world_size=2,
                           batches_per_epoch=20) == (1, 2)
    # past the new epoch's end: the next epoch
    assert resume_position(2, 6, saved_batch_size=4, saved_world_size=2, batch_size=8, world_size=2,
                           batches_per_epoch=3) == (3, 0)


def test_rng_for_resume_restores_or_starts_fresh_streams():
    from ms_diffusion.training.distributed import fresh_rng, rng_for_resume

    streams = [fresh_rng(7, r) for r in range(2)]
    for g in streams:
        g.standard_normal(5)
    meta = {"seed": 7, "world_size": 2, "rng": streams[0].bit_generator.state,
            "rng_ranks": [g.bit_generator.state for g in streams]}
    for rank in range(2):
        rng, restored = rng_for_resume(meta, seed=7, rank=rank, world_size=2, step=3)
        assert restored and rng.standard_normal(3).tolist() == streams[rank].standard_normal(3).tolist()
    single = {"seed": 7, "world_size": 1, "rng": streams[0].bit_generator.state}
    rng, restored = rng_for_resume(single, seed=7, rank=0, world_size=1, step=3)
    assert restored
    fresh = [rng_for_resume(single, seed=7, rank=r, world_size=2, step=3) for r in range(2)]
    assert not fresh[0][1] and not fresh[1][1]
    draws = [g.standard_normal(4) for g, _ in fresh]
    assert not np.allclose(draws[0], draws[1])                 # still independent per rank
    assert np.array_equal(draws[1], fresh_rng(7, 1, 3).standard_normal(4))
    assert not rng_for_resume(meta, seed=8, rank=0, world_size=2, step=3)[1]   # another seed


def test_state_digest_sees_every_byte_and_the_position():
    from ms_diffusion.training.distributed import all_gather, check_replicas, state_digest

    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(2, np.int32)}
    base = state_digest(arrays, (1, 0, 2))
    changed = dict(arrays, a=arrays["a"].copy())
    changed["a"][1, 2] = np.nextafter(np.float32(5), np.float32(6))
    assert state_digest(changed, (1, 0, 2)) != base
    assert state_digest(arrays, (1, 0, 3)) != base
    assert state_digest(dict(arrays, b=arrays["b"].astype(np.int64)), (1, 0, 2)) != base
    assert state_digest(dict(reversed(list(arrays.items()))), (1, 0, 2)) == base
    assert all_gather(np.array([3, 4])).tolist() == [[3, 4]]    # one process: a single row
    check_replicas(arrays, 1, 0, 2, "in a single process")      # no-op without data parallel


# ---------------------------------------------------------------------- launcher and msrun

@needs_msrun
def test_launcher_usage_errors(tmp_path):
    proc = subprocess.run(["bash", str(LAUNCHER)], capture_output=True, text=True)
    assert proc.returncode == 2 and "Usage: bash scripts/run_distribute_train.sh" in proc.stderr
    proc = subprocess.run(["bash", str(LAUNCHER), "two", "x.yaml"], capture_output=True, text=True)
    assert proc.returncode == 2 and "NUM_WORKERS must be a positive integer, got 'two'" in proc.stderr
    proc = subprocess.run(["bash", str(LAUNCHER), "2", str(tmp_path / "missing.yaml")], capture_output=True, text=True)
    assert proc.returncode == 2 and "missing.yaml' not found" in proc.stderr
    proc = subprocess.run(["bash", str(LAUNCHER), "--nnodes", "2", "8", "cifar10"], capture_output=True, text=True)
    assert proc.returncode == 2 and "master node's IP address" in proc.stderr


def test_launch_detection_from_the_environment(monkeypatch):
    from ms_diffusion.training.distributed import launched_by_msrun, launched_by_rank_table

    for var in ("MS_ROLE", "RANK_TABLE_FILE", "MINDSPORE_HCCL_CONFIG_PATH", "RANK_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert not launched_by_msrun() and not launched_by_rank_table()
    monkeypatch.setenv("RANK_TABLE_FILE", "/x/hccl_8p.json")
    assert not launched_by_rank_table()                        # RANK_SIZE missing: one process
    monkeypatch.setenv("RANK_SIZE", "8")
    assert launched_by_rank_table() and not launched_by_msrun()
    monkeypatch.setenv("MS_ROLE", "MS_WORKER")                 # msrun wins over a stale rank table
    assert launched_by_msrun() and not launched_by_rank_table()
    monkeypatch.setenv("MS_ROLE", "MS_SCHED")
    assert launched_by_msrun()


_FAKE_RANK = """import os, signal, sys, time
from pathlib import Path
print("args", *sys.argv[1:])
print("env", *(f"{k}={os.environ.get(k)}" for k in ("RANK_ID", "RANK_SIZE", "DEVICE_ID", "ASCEND_RT_VISIBLE_DEVICES",
                                                  "RANK_TABLE_FILE", "MS_ROLE")), flush=True)
rank, ready = os.environ["RANK_ID"], os.environ.get("READY_FILE")
if rank == os.environ.get("HOLD_RANK"):      # runs until someone stops it, and says who did
    def stopped(signum, frame):
        print(f"rank {rank} stopped by {signal.Signals(signum).name}", flush=True)
        sys.exit(128 + signum)
    signal.signal(signal.SIGTERM, stopped)
    print(f"pid {os.getpid()}", flush=True)
    Path(ready).write_text("ready")           # the handler is in place: the failing rank may go
    time.sleep(600)                           # never reached in a passing test; bounds a leaked process
    print(f"rank {rank} was never stopped", flush=True)
if rank == os.environ.get("FAIL_RANK"):
    while ready and not Path(ready).exists():  # fail only once the held rank can report its SIGTERM
        time.sleep(0.01)
    sys.exit("rank failed on purpose")
"""


def test_rank_table_launcher_sets_each_rank_and_names_a_failed_one(tmp_path):
    """The rank-table script's process handling, with a stand-in for train.py (no NPUs needed)."""
    table = tmp_path / "hccl_4p.json"
    table.write_text(json.dumps({"version": "1.0", "server_count": "1", "status": "completed", "server_list": [
        {"server_id": "10.0.0.1", "device": [{"device_id": str(i), "device_ip": f"192.168.100.{i}",
                                              "rank_id": str(i)} for i in range(4)]}]}))
    fake = tmp_path / "fake_train.py"
    fake.write_text(_FAKE_RANK)
    env = dict(os.environ, TRAIN_SCRIPT=str(fake), LOG_DIR=str(tmp_path / "ok"), RANK_START="2", DEVICE_START="4",
               MS_ROLE="MS_WORKER")
    cmd = ["bash", str(RANKTABLE), str(table), "2", str(tmp_path / "c.yaml"), "--steps", "3"]
    (tmp_path / "c.yaml").write_text("name: x\n")
    ok = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "all 2 rank(s) on this node finished" in ok.stdout, ok.stderr
    for rank, device in ((2, 4), (3, 5)):
        log = (tmp_path / "ok" / f"rank_{rank}.log").read_text()
        assert f"args --config {tmp_path / 'c.yaml'} --device Ascend --steps 3" in log
        assert (f"env RANK_ID={rank} RANK_SIZE=4 DEVICE_ID={device} ASCEND_RT_VISIBLE_DEVICES={device} "
                f"RANK_TABLE_FILE={table} MS_ROLE=None") in log

    # rank 3 fails once rank 2 (which would run for 10 minutes) is up; the launcher must stop rank 2 with
    # SIGTERM before it exits. Rank 2's log says so: checked on the event, not on how long the launcher took.
    env.update(LOG_DIR=str(tmp_path / "bad"), FAIL_RANK="3", HOLD_RANK="2", READY_FILE=str(tmp_path / "rank_2_ready"))
    try:
        bad = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)   # a hang guard only
        assert bad.returncode == 1, bad.stderr
        assert re.search(r"FAILED: rank 3 \(pid \d+\) exited with status 1; stopping the other ranks", bad.stderr)
        assert f"its log: {tmp_path / 'bad' / 'rank_3.log'}" in bad.stderr and "rank failed on purpose" in bad.stderr
        held = (tmp_path / "bad" / "rank_2.log").read_text()
        assert "rank 2 stopped by SIGTERM" in held, held   # written before it exited, and the launcher waits for that
    finally:   # a launcher that forgot rank 2 must not leave it running
        log = tmp_path / "bad" / "rank_2.log"
        text = log.read_text() if log.exists() else ""
        found = re.search(r"^pid (\d+)$", text, re.M)
        if found and "stopped by" not in text:
            try:
                if str(fake) in Path(f"/proc/{found.group(1)}/cmdline").read_text():
                    os.kill(int(found.group(1)), signal.SIGKILL)
            except OSError:
                pass

    usage = [(["bash", str(RANKTABLE)], "Usage: bash scripts/run_distribute_train_ranktable.sh"),
             (["bash", str(RANKTABLE), str(tmp_path / "none.json"), "2", "c"], "none.json' not found"),
             (["bash", str(RANKTABLE), str(fake), "2", str(tmp_path / "c.yaml")], "cannot read the device list")]
    for args, message in usage:
        proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
    for var in ("FAIL_RANK", "HOLD_RANK", "READY_FILE"):
        env.pop(var)
    env["RANK_SIZE"] = "1"
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "for one device use scripts/run_standalone_train.sh" in proc.stderr


def test_standalone_launcher_usage_errors(tmp_path):
    proc = subprocess.run(["bash", str(STANDALONE)], capture_output=True, text=True)
    assert proc.returncode == 2 and "Usage: bash scripts/run_standalone_train.sh" in proc.stderr
    proc = subprocess.run(["bash", str(STANDALONE), str(tmp_path / "missing.yaml")], capture_output=True, text=True)
    assert proc.returncode == 2 and "missing.yaml' not found" in proc.stderr
    proc = subprocess.run(["bash", str(STANDALONE), "fashion_mnist_fast"], capture_output=True, text=True,
                          env=dict(os.environ, DEVICE_TARGET="TPU"))
    assert proc.returncode == 2 and "unknown DEVICE_TARGET 'TPU'" in proc.stderr


@pytest.mark.slow
@needs_msrun
def test_replicas_identical_and_equal_one_process_on_the_global_batch(workdir, uninterrupted):
    # the same 8 updates in one process, on the concatenation of the two ranks' batches and noise (computed
    # while the launch runs; compared with it below)
    ref, ref_rngs = _reference(workdir / "tiny.yaml", workdir / "ref", STEPS)
    proc, out, log_dir, dump = uninterrupted()
    assert "all 2 worker(s) on this node finished" in proc.stdout
    a, info_a = _dump(dump, 0)
    b, info_b = _dump(dump, 1)
    assert info_a["step"] == info_b["step"] == STEPS and (info_a["world_size"], info_b["world_size"]) == (2, 2)
    assert (info_a["epoch"], info_a["batch_in_epoch"]) == (info_b["epoch"], info_b["batch_in_epoch"]) == (1, 2)
    between_ranks = _max_diff(a, b)
    print(f"\nmax |rank 0 - rank 1| over all state: {between_ranks:.3g}")
    assert between_ranks == 0.0                                 # weights, EMA, Adam moments, loss scale
    assert _max_diff(a, b, "ema.") == 0.0 and any(k.startswith("optimizer.moment1") for k in a)
    assert info_a["rng"] != info_b["rng"]                      # each rank draws its own noise and timesteps

    # rank 0 alone wrote the run folder, and its last checkpoint is exactly rank 0's state
    ckpt, meta = load_checkpoint(latest_checkpoint(out / "checkpoints"))
    assert meta["step"] == STEPS and meta["world_size"] == 2 and len(meta["rng_ranks"]) == 2
    assert meta["rng_ranks"][0] == info_a["rng"] and meta["rng_ranks"][1] == info_b["rng"]
    assert _max_diff({k: ckpt[k] for k in a}, a) == 0.0
    lines = (out / "log.jsonl").read_text().splitlines()
    assert len(lines) == STEPS and json.loads(lines[-1])["step"] == STEPS  # one writer, one line per step
    assert "replicas verified identical" in (log_dir / "worker_0.log").read_text()

    # the one-process reference: the same 8 updates
    assert ref_rngs == [info_a["rng"], info_b["rng"]]           # the workers drew exactly these streams
    vs_ref = {group: _max_diff(a, ref, group + ".") for group in ("online", "ema", "optimizer")}
    print(f"max |2 workers - 1 process|: {vs_ref}")
    assert all(d < TOL for d in vs_ref.values()), vs_ref
    # and the updates were not trivially small: the weights moved far more than the tolerance
    start = load_checkpoint(out / "checkpoints" / f"step_{SAVE_EVERY:08d}.ckpt")[0]
    assert _max_diff({k: start[k] for k in a}, a, "online.") > 100 * TOL


@pytest.mark.slow
@needs_msrun
def test_killed_worker_fails_the_launcher_and_the_run_resumes(workdir, uninterrupted):
    out, log_dir = workdir / "killed", workdir / "killed_logs"
    # a run far longer than the test; rank 1 is killed with SIGKILL right after the first checkpoint
    proc = subprocess.Popen(_launch_cmd(workdir, out, ["--steps", 400]), cwd=workdir,
                            env=_launch_env(log_dir, None), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    target = out / "checkpoints" / f"step_{SAVE_EVERY:08d}.ckpt"
    deadline = time.time() + 300
    while not target.exists():
        assert proc.poll() is None, f"the launcher ended before the first checkpoint:\n{proc.communicate()}"
        assert time.time() < deadline, "no checkpoint after 300 s"
        time.sleep(0.005)
    found = re.search(r"data-parallel worker: pid (\d+) is rank 1 of 2", (log_dir / "worker_1.log").read_text())
    assert found, "rank 1 did not announce its pid"
    pid = int(found.group(1))
    os.kill(pid, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode != 0
    assert f"worker rank 1 (pid {pid}) was killed by signal 9 (SIGKILL)" in stderr, stderr
    assert f"its log: {log_dir / 'worker_1.log'}" in stderr and "with --resume" in stderr
    steps = [s for s, _ in list_checkpoints(out / "checkpoints")]
    assert steps and steps[-1] < STEPS, steps

    # the same command with --resume (and the test's step count) continues from the last checkpoint
    resumed, _, rlogs, rdump = _launch(workdir, "resumed", ["--resume", "--steps", STEPS], out=out)
    assert f"at step {steps[-1]}" in (rlogs / "worker_0.log").read_text()
    a, meta_a = load_checkpoint(latest_checkpoint(uninterrupted()[1] / "checkpoints"))
    b, meta_b = load_checkpoint(latest_checkpoint(out / "checkpoints"))
    assert meta_a["step"] == meta_b["step"] == STEPS and set(a) == set(b)
    assert max(float(np.max(np.abs(a[k] - b[k]))) if a[k].size else 0.0 for k in a) == 0.0
    assert meta_a["rng_ranks"] == meta_b["rng_ranks"]          # each rank continued its own noise stream
    assert (meta_a["epoch"], meta_a["batch_in_epoch"]) == (meta_b["epoch"], meta_b["batch_in_epoch"])
    r0, _ = _dump(rdump, 0)
    r1, _ = _dump(rdump, 1)
    assert _max_diff(r0, r1) == 0.0


def test_single_device_checkpoint_loads_into_each_rank_of_two(workdir, tmp_path):
    """A 1-device checkpoint continued by 2 workers (docs/distributed.md, Resume): every rank restores the
    weights, converts the data position through the images consumed and starts a fresh noise stream.
    Trainer.load is the same code under msrun; the collectives it adds are covered by the msrun tests."""
    from ms_diffusion.training.distributed import fresh_rng

    one, _ = _trainer(workdir / "tiny.yaml", tmp_path / "one", rank=0, world_size=1, batch_size=WORLD * BATCH)
    # as after 4 updates of 1 device x batch 8: 32 of the 48 images of epoch 0 consumed
    one.step, one.epoch, one.batch_in_epoch = 4, 0, 4
    one.rng.standard_normal(10)
    weights = next(iter(one._state_groups()["online"].values()))
    weights.set_data(weights + 0.25)                             # a state the fresh replicas do not have
    (tmp_path / "one").mkdir()
    ckpt = one.save()

    for rank in range(WORLD):
        logs: List[str] = []
        two, _ = _trainer(workdir / "tiny.yaml", tmp_path / "two", rank=rank, world_size=WORLD, batch_size=BATCH)
        two.log = logs.append
        two.resume(str(ckpt))
        assert (two.step, two.epoch, two.batch_in_epoch) == (4, 0, 4)   # 32 images = 4 batches of 2 x 4
        assert _max_diff(_state(two), _state(one)) == 0.0
        assert not two.rng_restored
        assert np.array_equal(two.rng.standard_normal(6), fresh_rng(5, rank, 4).standard_normal(6))
        text = "\n".join(logs)
        assert "at step 4 (epoch 0, batch 4)" in text and "fresh stream seeded by (seed, rank, step 4)" in text
