"""Time and peak memory of reading a training checkpoint: its metadata alone (what train.py --resume reads
first) and the whole file, with our entry-by-entry reader and with ``mindspore.load_checkpoint``; PyTorch's
``torch.load`` of the same tensors for comparison.

    python bench/checkpoint_io.py                  # 1.1 GB: three float32 tensors, one over MindSpore's 512 MB slice
    python bench/checkpoint_io.py --mb 300

Each reading is its own process; peak RSS is that process's high-water mark (VmHWM) less its high-water mark
before reading (imports), so it is what the reading itself added. The file is written once by
``io.checkpoint.save_checkpoint`` (MindSpore's writer) under a temporary folder.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

READ = """
import json, sys, time
sys.path.insert(0, sys.argv[3])
import numpy as np
how, path = sys.argv[1], sys.argv[2]
if how.startswith("torch"):
    import torch
else:
    import mindspore as ms
    from ms_diffusion.io.checkpoint import META_KEY, load_checkpoint, read_checkpoint_meta

def hwm():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) * 1024

before, start = hwm(), time.perf_counter()
if how == "ours-meta":
    read_checkpoint_meta(path)
elif how == "ours-full":
    load_checkpoint(path)
elif how == "mindspore-meta":
    json.loads(str(ms.load_checkpoint(path, choice_func=lambda name: name == META_KEY)[META_KEY]))
elif how == "mindspore-full":
    arrays = {k: v.asnumpy() for k, v in ms.load_checkpoint(path).items() if k != META_KEY}
elif how == "torch-full":
    state = torch.load(path, weights_only=True)
seconds = time.perf_counter() - start
print(json.dumps({"case": how, "seconds": seconds, "added_gb": (hwm() - before) / 2**30}))
"""

CASES = ("ours-meta", "mindspore-meta", "ours-full", "mindspore-full", "torch-full")


def _write(folder: Path, mb: int) -> tuple:
    """(our .ckpt, a torch .pt of the same tensors, total GB): a big tensor over MindSpore's 512 MB slice size
    and two smaller ones, each 1/2, 1/4 and 1/4 of ``mb``."""
    script = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
import numpy as np
from ms_diffusion.io.checkpoint import save_checkpoint
rng = np.random.default_rng(0)
n = {mb} * 2**20 // 4
tensors = {{"big": rng.standard_normal(n // 2, dtype=np.float32), "a": rng.standard_normal(n // 4, dtype=np.float32),
            "b": rng.standard_normal(n // 4, dtype=np.float32)}}
save_checkpoint({str(folder / "step.ckpt")!r}, tensors, {{"step": 1, "config": {{"name": "bench"}}}})
try:
    import torch
    torch.save({{k: torch.from_numpy(v) for k, v in tensors.items()}}, {str(folder / "step.pt")!r})
except ImportError:
    pass
"""
    subprocess.run([sys.executable, "-c", script], check=True)
    return folder / "step.ckpt", folder / "step.pt", (folder / "step.ckpt").stat().st_size / 2**30


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=int, default=1100, help="checkpoint size in MB (default 1100)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="checkpoint_io_") as tmp:
        ckpt, pt, gb = _write(Path(tmp), args.mb)
        rows = {}
        for case in CASES:
            path = pt if case.startswith("torch") else ckpt
            if not path.exists():
                print(f"{case}: skipped (torch not installed)")
                continue
            proc = subprocess.run([sys.executable, "-c", READ, case, str(path), str(ROOT)], capture_output=True,
                                  text=True)
            if proc.returncode:
                print(f"{case}: failed\n{proc.stderr[-2000:]}")
                return 1
            rows[case] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\nreading a {gb:.2f} GB checkpoint (each case its own process; memory added by the reading)\n")
    print(f"| case | seconds | peak RSS added (GB) |\n|---|---:|---:|")
    for case, row in rows.items():
        print(f"| {case} | {row['seconds']:.3f} | {row['added_gb']:.3f} |")
    for what in ("meta", "full"):
        ours, theirs = rows.get(f"ours-{what}"), rows.get(f"mindspore-{what}")
        if ours and theirs:
            print(f"{what}: ours {ours['seconds'] * 1000:.1f} ms and {ours['added_gb'] * 1024:.0f} MB, "
                  f"mindspore.load_checkpoint {theirs['seconds'] * 1000:.0f} ms and {theirs['added_gb'] * 1024:.0f} MB")
    if "torch-full" in rows and "ours-full" in rows:
        print(f"full: ours / torch.load = {rows['ours-full']['seconds'] / rows['torch-full']['seconds']:.2f}x time, "
              f"{rows['ours-full']['added_gb'] / max(rows['torch-full']['added_gb'], 1e-9):.2f}x memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
