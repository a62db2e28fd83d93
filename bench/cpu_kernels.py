#!/usr/bin/env python
"""Our CPU kernels (issue 16) in one run: first-use build time, the per-op table, the train step,
sampling step and a whole DDIM-20 sample against PyTorch (lucidrains) for the bench configuration and
the default config's network, and optionally the test suite's wall time with the kernels on and off.

    python bench/cpu_kernels.py                 # ~10 minutes on 2 cores
    python bench/cpu_kernels.py --suite         # + README's test command twice (kernels on / off): ~30 min more

It runs ``bench/ops.py`` and ``bench/train_step.py`` (see their docstrings for what each row means)
and prints their tables as they come.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BUILD = ("import time; t = time.perf_counter(); import ms_diffusion; "
         "from ms_diffusion.kernels.build import build_library; lib = build_library(); "
         "print(f'{time.perf_counter() - t:.2f}', lib)")


def _run(cmd, env=None) -> None:
    print(f"$ {' '.join(cmd[1:] if cmd[0] == sys.executable else cmd)}", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, **(env or {})), text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
    print("\n".join(line for line in proc.stdout.splitlines() if "WARNING" not in line), flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed with exit code {proc.returncode}")


def build_time() -> None:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, MS_DIFFUSION_KERNEL_CACHE=cache, GLOG_v="3")
        cold = subprocess.run([sys.executable, "-c", BUILD], capture_output=True, text=True, env=env, cwd=ROOT)
        warm = subprocess.run([sys.executable, "-c", BUILD], capture_output=True, text=True, env=env, cwd=ROOT)
    if cold.returncode or warm.returncode:
        raise SystemExit(f"the kernel library does not build:\n{cold.stderr[-2000:]}")
    (c, _), (w, _) = (r.stdout.split()[-2:] for r in (cold, warm))
    print(f"first-use build of the kernel library: {c} s (import included; an already built one: {w} s)")


def suite(kernels: bool) -> float:
    cmd = [sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadfile", "tests"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, MS_DIFFUSION_CPU_KERNELS="1" if kernels else "0"),
                          capture_output=True, text=True)
    took = time.perf_counter() - t
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
    print(f"test suite, kernels {'on' if kernels else 'off'}: {took:.0f} s ({tail})", flush=True)
    return took


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", action="store_true", help="also time the test suite with the kernels on and off")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} at the start; {os.cpu_count()} CPU cores", flush=True)
    build_time()
    _run([sys.executable, "bench/ops.py", "--reps", str(args.reps), "--no-isa-compare"])
    _run([sys.executable, "bench/train_step.py", "--no-isa-compare"])
    _run([sys.executable, "bench/train_step.py", "--dim", "16", "--batch", "32"])
    if args.suite:
        on, off = suite(True), suite(False)
        print(f"test suite: {off:.0f} s with MindSpore's built-in ops, {on:.0f} s with our kernels "
              f"({off / on:.2f}x faster)")
    print(f"load average {os.getloadavg()[0]:.1f} at the end", flush=True)


if __name__ == "__main__":
    main()
