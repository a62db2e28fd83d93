#!/usr/bin/env python
"""Data-parallel throughput on this machine: the full training loop with 1 and 2 msrun workers.

    python bench/distributed_throughput.py                    # fashion_mnist_fast's model, batch 32/worker
    python bench/distributed_throughput.py --steps 60 --batch 16 --bind-core

Every run is the real thing: scripts/run_distribute_train.sh (msrun) -> train.py, data pipeline and
all, on generated 28x28 gray images (or --data-dir). Throughput is taken from each run's log.jsonl
(global images per second between the end of step --warmup and the last step, so start-up and
graph compilation are excluded). Rows: plain ``python train.py`` (no msrun), msrun with 1 worker,
msrun with 2 workers (per-worker batch fixed, so 2 workers update with twice the global batch),
and, with --bind-core, 2 workers pinned to their own cores by msrun. Prints the rows and the
2-worker / 1-worker ratio.

On a 2-core CPU two workers share the two cores that one process already uses (MindSpore's CPU
kernels are multi-threaded), so expect a ratio near or below 1: this measures the launcher and
collectives' overhead honestly, not a speed-up. Devices (Ascend/GPU) are where data parallel scales.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = ROOT / "scripts" / "run_distribute_train.sh"


def make_images(folder: Path, n: int, size: int = 28) -> None:
    """``n`` deterministic gray ``size`` x ``size`` PNGs (blobs and stripes) in ``folder``."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        if i % 2:
            cy, cx, r = rng.uniform(8, size - 8, 2).tolist() + [rng.uniform(4, 9)]
            img = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) * 200.0
        else:
            img = (((xx + yy * (i % 3) + i) // 4) % 2) * 180.0
        Image.fromarray(np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)).save(
            folder / f"{i:05d}.png")


def write_config(path: Path, data_dir: Path, args: argparse.Namespace) -> None:
    base = yaml.safe_load((ROOT / "configs" / "fashion_mnist_fast.yaml").read_text())
    cfg = {
        "name": "dp_bench", "seed": 0, "model": base["model"], "diffusion": base["diffusion"],
        "data": {"name": "image_folder", "data_dir": str(data_dir), "random_flip": True},
        "train": {"num_steps": args.steps, "batch_size": args.batch, "lr": 2e-4, "log_every": 1,
                  "save_every": 10 ** 9, "sample_every": 0, "num_samples": 0, "export_safetensors": False,
                  "progress": False, "ema_update_every": 1, "ema_update_after_step": 10},
    }
    path.write_text(yaml.safe_dump(cfg))


def throughput(log: Path, warmup: int) -> Dict[str, float]:
    """Global img/s between the end of step ``warmup`` and the last step of a run's log.jsonl."""
    recs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    first = next(r for r in recs if r["step"] == warmup)
    last = recs[-1]
    return {"steps_timed": last["step"] - first["step"], "seconds": last["time"] - first["time"],
            "first_img_per_s": first["img_per_s"]}


def run(name: str, cmd: List[str], env: Dict[str, str], out: Path, images_per_step: int,
        warmup: int) -> Optional[Dict[str, float]]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(f"{name}: FAILED ({proc.returncode})\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    t = throughput(out / "log.jsonl", warmup)
    t.update(name=name, wall_s=wall, img_per_s=t["steps_timed"] * images_per_step / t["seconds"],
             images_per_step=images_per_step)
    return t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="optimizer updates per run (default 30)")
    p.add_argument("--warmup", type=int, default=6, help="updates excluded from the timing (default 6)")
    p.add_argument("--batch", type=int, default=32, help="per-worker batch (default 32)")
    p.add_argument("--images", type=int, default=1024, help="generated images (default 1024)")
    p.add_argument("--data-dir", default=None, help="use this image folder instead of generated images")
    p.add_argument("--bind-core", action="store_true", help="also run 2 workers with msrun --bind_core=True")
    p.add_argument("--device", default="CPU", choices=("CPU", "GPU", "Ascend"),
                   help="device of every run (default CPU; Ascend/GPU give each worker its own device)")
    p.add_argument("--json", default=None, help="write the results here as JSON")
    args = p.parse_args()
    if args.warmup >= args.steps:
        p.error("--warmup must be below --steps")

    with tempfile.TemporaryDirectory(prefix="dp_bench_") as tmp:
        tmp = Path(tmp)
        data = Path(args.data_dir) if args.data_dir else tmp / "images"
        if not args.data_dir:
            make_images(data, args.images)
        cfg = tmp / "bench.yaml"
        write_config(cfg, data, args)
        env = dict(os.environ, DEVICE_TARGET=args.device, GLOG_v="3")
        rows = []
        plain = [sys.executable, str(ROOT / "train.py"), "--config", str(cfg), "--device", args.device,
                 "--out-dir", str(tmp / "plain")]
        rows.append(run("1 process, no msrun", plain, env, tmp / "plain", args.batch, args.warmup))
        for workers, bind in ((1, False), (2, False)) + (((2, True),) if args.bind_core else ()):
            name = f"msrun {workers} worker{'s' if workers > 1 else ''}" + (", --bind_core" if bind else "")
            out = tmp / f"w{workers}{'b' if bind else ''}"
            cmd = ["bash", str(LAUNCHER), "--bind-core", str(bind).lower(), "--log-dir", str(out / "logs"),
                   str(workers), str(cfg), "--out-dir", str(out)]
            rows.append(run(name, cmd, env, out, args.batch * workers, args.warmup))

    print(f"\ndata-parallel throughput on {args.device}, {os.cpu_count()} CPU cores, "
          f"model of configs/fashion_mnist_fast.yaml (28x28x1), batch {args.batch} per worker, "
          f"steps {args.warmup + 1}..{args.steps} timed")
    print(f"{'run':<30} {'global batch':>12} {'img/s':>8} {'s/step':>8} {'wall s':>8}")
    for r in rows:
        if r is None:
            continue
        print(f"{r['name']:<30} {r['images_per_step']:>12} {r['img_per_s']:>8.1f} "
              f"{r['seconds'] / r['steps_timed']:>8.3f} {r['wall_s']:>8.1f}")
    by_name = {r["name"]: r for r in rows if r is not None}
    one, two = by_name.get("msrun 1 worker"), by_name.get("msrun 2 workers")
    if one and two:
        print(f"ratio 2 workers / 1 worker: {two['img_per_s'] / one['img_per_s']:.2f}x "
              f"(ideal 2.00x with one device per worker)")
    if args.json:
        Path(args.json).write_text(json.dumps([r for r in rows if r is not None], indent=2))
    return 0 if all(r is not None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
