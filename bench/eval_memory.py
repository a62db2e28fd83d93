"""Peak memory (RSS) of ``evaluate.py`` on N generated images of a given size: the figures in docs/evaluation.md.

    python bench/eval_memory.py                          # 10,000 samples at 1x28x28 and 3x256x256
    python bench/eval_memory.py --num 2000 --sizes 1x28x28,3x64x64 --metric fd

Each case is one ``evaluate.py`` process; its peak resident set is the kernel's high-water mark of
that process's own memory (``VmHWM`` in /proc/self/status, read at exit). Not ``ru_maxrss``: Linux
carries the parent's resident size over ``fork``+``exec`` into the child's ``ru_maxrss``, so a big
parent inflates it. The samples are synthetic (smooth random blobs), made by a separate process and
written as a uint8 ``.npz`` (compressed: the file stays small; as float32 in memory 10,000 RGB
images of 256x256 would be 7.9 GB). The real data is a Fashion-MNIST look-alike with
the real split sizes (60,000 train, 10,000 test) unless ``--data-dir`` names the real one; memory
does not depend on the pixel values. ``--no-cache`` is passed so every reference is computed.

Metrics: by default all four at 28x28; at larger sizes fd,kid,pr (the memorisation check compares
every sample with every training image in pixel space: 10,000 x 60,000 comparisons of 196,608
values at 256x256, hours on a CPU; its memory is bounded the same way, see docs/evaluation.md).
"""
from __future__ import annotations

import argparse
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _blobs(rng: np.random.Generator, n: int, c: int, h: int, w: int) -> np.ndarray:
    """n smooth random images uint8 (n, c, h, w): a few Gaussian blobs each (compress well, unlike noise)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty((n, c, h, w), np.uint8)
    for i in range(n):
        img = np.zeros((c, h, w), np.float32)
        for _ in range(3):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            r = rng.uniform(0.05, 0.3) * min(h, w)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
            img += blob[None] * rng.uniform(0.2, 1.0, (c, 1, 1)).astype(np.float32)
        out[i] = np.clip(img * 200, 0, 255).astype(np.uint8)
    return out


def _write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{prefix}-images-idx3-ubyte", "wb") as f:
        f.write(struct.pack(">IIII", 2051, len(images), 28, 28) + images.astype(np.uint8).tobytes())
    with open(folder / f"{prefix}-labels-idx1-ubyte", "wb") as f:
        f.write(struct.pack(">II", 2049, len(labels)) + labels.astype(np.uint8).tobytes())


def _fake_fashion_mnist(folder: Path, train: int, test: int) -> Path:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", train), ("t10k", test)):
        _write_idx(folder, prefix, _blobs(rng, n, 1, 28, 28)[:, 0], rng.integers(0, 10, n))
    return folder


#: Runs a script (argv[1:]) and prints its own peak resident set (VmHWM, KiB) when it exits.
PEAK_WRAPPER = """
import atexit, os, runpy, sys
def _peak():
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmHWM:'):
                print('peak-rss-kib', int(line.split()[1]), flush=True)
atexit.register(_peak)
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def measure(argv, env, cwd=ROOT) -> tuple:
    """(exit code, peak RSS in bytes, seconds, output) of ``python argv`` in a child process."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK_WRAPPER] + [str(a) for a in argv], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, env=env, cwd=cwd)
    out = proc.stdout.decode(errors="replace")
    peaks = [int(line.split()[1]) * 1024 for line in out.splitlines() if line.startswith("peak-rss-kib ")]
    return proc.returncode, (peaks[-1] if peaks else -1), time.perf_counter() - start, out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num", type=int, default=10000, help="samples per case (default 10000)")
    p.add_argument("--sizes", default="1x28x28,3x256x256", help="comma-separated CxHxW (default 1x28x28,3x256x256)")
    p.add_argument("--metric", default=None, help="metrics for every case (default: all at 28x28, fd,kid,pr above)")
    p.add_argument("--max-reference", type=int, default=None, help="passed to evaluate.py (default: whole split)")
    p.add_argument("--data-dir", default=None, help="real Fashion-MNIST folder (default: a synthetic look-alike)")
    p.add_argument("--train", type=int, default=60000, help="synthetic train split size (default 60000)")
    p.add_argument("--test", type=int, default=10000, help="synthetic test split size (default 10000)")
    p.add_argument("--make-samples", nargs=3, metavar=("PATH", "CxHxW", "N"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.make_samples:   # in its own process, so that the measured ones are not forked from a big parent
        path, spec, n = args.make_samples
        c, h, w = (int(v) for v in spec.lower().split("x"))
        np.savez_compressed(path, images=_blobs(np.random.default_rng(1), int(n), c, h, w))
        return 0

    with tempfile.TemporaryDirectory(prefix="eval_memory_") as tmp:
        tmp = Path(tmp)
        data = Path(args.data_dir) if args.data_dir else _fake_fashion_mnist(tmp / "fmnist", args.train, args.test)
        env = dict(os.environ, MS_DIFFUSION_CACHE=str(tmp / "cache"))
        rows = []
        for spec in args.sizes.split(","):
            c, h, w = (int(v) for v in spec.lower().split("x"))
            metric = args.metric or ("all" if (h, w) == (28, 28) else "fd,kid,pr")
            path = tmp / f"samples_{c}x{h}x{w}.npz"
            subprocess.run([sys.executable, __file__, "--make-samples", str(path), spec, str(args.num)], check=True)
            argv = [ROOT / "evaluate.py", "--samples", path, "--data-dir", data, "--metric", metric, "--no-cache",
                    "--bootstrap", 0]
            if args.max_reference:
                argv += ["--max-reference", args.max_reference]
            code, rss, seconds, out = measure(argv, env)
            if code != 0:
                print(out)
                print(f"evaluate.py failed on {spec} (exit {code})")
                return 1
            rows.append((f"{c}x{h}x{w}", args.num, metric, rss, seconds, args.num * c * h * w * 4))
            print(f"{spec}: peak RSS {rss / 1e9:.2f} GB in {seconds:.0f} s", flush=True)
        reference = f"--max-reference {args.max_reference}" if args.max_reference else "the whole train split"
        origin = f"the data in {data}" if args.data_dir else f"a {args.train}/{args.test} Fashion-MNIST look-alike"
        print(f"evaluate.py peak RSS (the process's VmHWM), {args.num} synthetic samples, reference {reference} "
              f"of {origin}")
        print(f"{'samples':>10}  {'N':>6}  {'metrics':<26}  {'peak RSS':>10}  {'time':>7}  {'samples as float32':>18}")
        for spec, n, metric, rss, seconds, f32 in rows:
            print(f"{spec:>10}  {n:>6}  {metric:<26}  {rss / 1e9:>7.2f} GB  {seconds:>5.0f} s  {f32 / 1e9:>15.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
