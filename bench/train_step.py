#!/usr/bin/env python
"""Train step and sampling step: ms_diffusion vs denoising-diffusion-pytorch on the same configuration.

    python bench/train_step.py                     # dim 32, mults 1,2,4, 28x28x1, batch 16
    python bench/train_step.py --no-isa-compare    # skip the (slow) run without the oneDNN workaround

Each measurement runs in its own process (clean peak memory, oneDNN reads its ISA cap at start-up).
Prints img/s for both frameworks and the ratio, our compile time and peak resident memory, and the
train-step time with and without the oneDNN AVX2 workaround of ms_diffusion.runtime.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_ms(args) -> dict:
    import numpy as np

    import ms_diffusion  # noqa: F401
    import mindspore as ms
    from mindspore import Tensor, nn

    from ms_diffusion import GaussianDiffusion, Unet
    from ms_diffusion.training.step import TrainStep

    ms.set_device("CPU")
    ms.set_seed(0)
    mults = tuple(int(m) for m in args.mults.split(","))
    d = GaussianDiffusion(Unet(dim=args.dim, dim_mults=mults, channels=args.channels), image_size=args.image,
                          objective="pred_noise", beta_schedule="linear")
    d.set_train(True)
    opt = nn.Adam(d.trainable_params(), learning_rate=1e-4, beta1=0.9, beta2=0.99)

    def loss_fn(img, t, noise):
        return d(img, None, t, noise, False, 0.0)

    step = TrainStep(loss_fn, opt, clip_grad_norm=1.0)
    rng = np.random.default_rng(0)
    img = rng.random((args.batch, args.channels, args.image, args.image)).astype(np.float32)
    inputs = d.training_inputs(img, rng)
    batch = (Tensor(img), Tensor(inputs["times"]), Tensor(inputs["noise"]))
    t0 = time.perf_counter()
    step(*batch)[0].asnumpy()
    compile_s = time.perf_counter() - t0
    step(*batch)[0].asnumpy()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step(*batch)[0]
    loss.asnumpy()
    train_s = (time.perf_counter() - t0) / args.steps

    d.set_train(False)
    denoise = d.denoiser(args.batch)
    x = Tensor(rng.standard_normal(img.shape).astype(np.float32))
    t0 = time.perf_counter()
    denoise(x, 500)[0].asnumpy()
    sample_compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(args.steps):
        out = denoise(x, 999 - i)[1]
    out.asnumpy()
    sample_s = (time.perf_counter() - t0) / args.steps
    params = sum(int(p.size) for p in d.trainable_params())
    return {"train_s": train_s, "sample_s": sample_s, "compile_s": compile_s, "sample_compile_s": sample_compile_s,
            "peak_mb": _peak_mb(), "params": params, "isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "default")}


def run_torch(args) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from tests.anchors import lucidrains

    L = lucidrains()
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    mults = tuple(int(m) for m in args.mults.split(","))
    d = L.GaussianDiffusion(L.Unet(dim=args.dim, dim_mults=mults, channels=args.channels), image_size=args.image,
                            objective="pred_noise", beta_schedule="linear")
    opt = torch.optim.Adam(d.parameters(), lr=1e-4, betas=(0.9, 0.99))
    img = torch.rand(args.batch, args.channels, args.image, args.image)

    def step():
        opt.zero_grad()
        loss = d(img)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(d.parameters(), 1.0)
        opt.step()
        return loss

    for _ in range(2):
        step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    train_s = (time.perf_counter() - t0) / args.steps
    d.eval()
    x = torch.randn_like(img)
    with torch.inference_mode():
        d.model_predictions(x, torch.full((args.batch,), 500), clip_x_start=True)
        t0 = time.perf_counter()
        for i in range(args.steps):
            d.model_predictions(x, torch.full((args.batch,), 999 - i), clip_x_start=True, rederive_pred_noise=True)
        sample_s = (time.perf_counter() - t0) / args.steps
    return {"train_s": train_s, "sample_s": sample_s, "peak_mb": _peak_mb(),
            "params": sum(p.numel() for p in d.parameters()), "torch": torch.__version__}


def _child(kind: str, args, env_extra=None) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--dim", str(args.dim), "--mults", args.mults, "--batch",
           str(args.batch), "--image", str(args.image), "--channels", str(args.channels), "--steps", str(args.steps)]
    env = dict(os.environ, **(env_extra or {}))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"{kind} run failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--mults", default="1,2,4")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image", type=int, default=28)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--no-isa-compare", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_ms(args) if args.child == "ms" else run_torch(args)))
        return
    b = args.batch
    ours = _child("ms", args)
    ref = _child("torch", args)
    print(f"config: Unet(dim={args.dim}, dim_mults=({args.mults})), {args.channels}x{args.image}x{args.image}, "
          f"batch {b}, {os.cpu_count()} CPU cores")
    print(f"parameters: ms_diffusion {ours['params']:,}  lucidrains {ref['params']:,}")
    print(f"{'':28s}{'ms_diffusion':>14s}{'PyTorch':>12s}{'ratio':>8s}")
    for name, key in (("train step (img/s)", "train_s"), ("sampling step (img/s)", "sample_s")):
        ours_ips, ref_ips = b / ours[key], b / ref[key]
        print(f"{name:28s}{ours_ips:14.1f}{ref_ips:12.1f}{ours_ips / ref_ips:8.2f}")
    for name, key in (("train step (ms)", "train_s"), ("sampling step (ms)", "sample_s")):
        print(f"{name:28s}{ours[key] * 1000:14.0f}{ref[key] * 1000:12.0f}")
    print(f"{'peak memory (MB)':28s}{ours['peak_mb']:14.0f}{ref['peak_mb']:12.0f}")
    print(f"compile: train step {ours['compile_s']:.1f} s, sampling step {ours['sample_compile_s']:.1f} s")
    if not args.no_isa_compare:
        slow_args = argparse.Namespace(**{**vars(args), "steps": 1})
        native = _child("ms", slow_args, {"MS_DIFFUSION_ONEDNN_ISA": "native"})
        print(f"oneDNN ISA: train step {ours['train_s'] * 1000:.0f} ms with the AVX2 cap (ms_diffusion default), "
              f"{native['train_s'] * 1000:.0f} ms without it ({native['train_s'] / ours['train_s']:.0f}x slower)")


if __name__ == "__main__":
    main()
