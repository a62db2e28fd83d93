#!/usr/bin/env python
"""Train step, sampling step and a whole DDIM sample: ms_diffusion vs denoising-diffusion-pytorch.

    python bench/train_step.py                     # dim 32, mults 1,2,4, 28x28x1, batch 16
    python bench/train_step.py --dim 16 --batch 32 # the default config's network and batch
    python bench/train_step.py --no-isa-compare    # skip the (slow) run without the oneDNN workaround

Each measurement runs in its own process (clean peak memory, oneDNN reads its ISA cap at start-up).
Prints img/s for MindSpore's built-in CPU ops (``MS_DIFFUSION_CPU_KERNELS=0``), for ms_diffusion as
it runs by default (our CPU kernels on), and for PyTorch, with the ratios to PyTorch; a whole DDIM
sample (``--sample-steps`` steps, batch ``--sample-batch``, compilation excluded); our compile time
and peak resident memory; and the train-step time with and without the oneDNN AVX2 workaround of
ms_diffusion.runtime.
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
    d.sample(batch_size=args.sample_batch, sampler="ddim", steps=args.sample_steps, seed=0).asnumpy()  # compiles
    t0 = time.perf_counter()
    d.sample(batch_size=args.sample_batch, sampler="ddim", steps=args.sample_steps, seed=1).asnumpy()
    whole_s = time.perf_counter() - t0
    params = sum(int(p.size) for p in d.trainable_params())
    from ms_diffusion import kernels
    return {"train_s": train_s, "sample_s": sample_s, "compile_s": compile_s, "sample_compile_s": sample_compile_s,
            "whole_s": whole_s, "peak_mb": _peak_mb(), "params": params,
            "isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "default"), "kernels": kernels.enabled()}


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
        ddim = L.GaussianDiffusion(d.model, image_size=args.image, objective="pred_noise", beta_schedule="linear",
                                   sampling_timesteps=args.sample_steps)
        ddim.sample(batch_size=args.sample_batch)
        t0 = time.perf_counter()
        ddim.sample(batch_size=args.sample_batch)
        whole_s = time.perf_counter() - t0
    return {"train_s": train_s, "sample_s": sample_s, "whole_s": whole_s, "peak_mb": _peak_mb(),
            "params": sum(p.numel() for p in d.parameters()), "torch": torch.__version__}


def _child(kind: str, args, env_extra=None) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--dim", str(args.dim), "--mults", args.mults, "--batch",
           str(args.batch), "--image", str(args.image), "--channels", str(args.channels), "--steps", str(args.steps),
           "--sample-batch", str(args.sample_batch), "--sample-steps", str(args.sample_steps)]
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
    p.add_argument("--sample-batch", type=int, default=32, help="batch of the whole DDIM sample (default 32)")
    p.add_argument("--sample-steps", type=int, default=20, help="steps of the whole DDIM sample (default 20)")
    p.add_argument("--no-isa-compare", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_ms(args) if args.child == "ms" else run_torch(args)))
        return
    b = args.batch
    ours = _child("ms", args)
    builtin = _child("ms", args, {"MS_DIFFUSION_CPU_KERNELS": "0"})
    ref = _child("torch", args)
    print(f"config: Unet(dim={args.dim}, dim_mults=({args.mults})), {args.channels}x{args.image}x{args.image}, "
          f"batch {b}, {os.cpu_count()} CPU cores; our CPU kernels {'on' if ours['kernels'] else 'OFF'}")
    print(f"parameters: ms_diffusion {ours['params']:,}  lucidrains {ref['params']:,}")
    print(f"{'':34s}{'built-in':>10s}{'ours':>10s}{'PyTorch':>10s}{'built-in/PT':>13s}{'ours/PT':>9s}"
          f"{'ours/built-in':>15s}")
    rows = (("train step (img/s)", "train_s", b), ("sampling step (img/s)", "sample_s", b),
            (f"DDIM-{args.sample_steps} sample, batch {args.sample_batch} (img/s)", "whole_s", args.sample_batch))
    for name, key, n in rows:
        a, o, r = n / builtin[key], n / ours[key], n / ref[key]
        print(f"{name:34s}{a:10.1f}{o:10.1f}{r:10.1f}{a / r:13.2f}{o / r:9.2f}{o / a:15.2f}")
    for name, key in (("train step (ms)", "train_s"), ("sampling step (ms)", "sample_s"),
                      ("whole sample (s)", "whole_s")):
        scale, fmt = (1000, ".0f") if key != "whole_s" else (1, ".2f")
        print(f"{name:34s}{builtin[key] * scale:10{fmt}}{ours[key] * scale:10{fmt}}{ref[key] * scale:10{fmt}}")
    print(f"{'peak memory (MB)':34s}{builtin['peak_mb']:10.0f}{ours['peak_mb']:10.0f}{ref['peak_mb']:10.0f}")
    print(f"compile (ours): train step {ours['compile_s']:.1f} s, sampling step {ours['sample_compile_s']:.1f} s "
          f"(built-in: {builtin['compile_s']:.1f} s, {builtin['sample_compile_s']:.1f} s)")
    if not args.no_isa_compare:
        slow_args = argparse.Namespace(**{**vars(args), "steps": 3})
        native = _child("ms", slow_args, {"MS_DIFFUSION_ONEDNN_ISA": "native", "MS_DIFFUSION_CPU_KERNELS": "0"})
        print(f"oneDNN ISA, built-in ops: train step {builtin['train_s'] * 1000:.0f} ms with the AVX2 cap "
              f"(ms_diffusion default), {native['train_s'] * 1000:.0f} ms without it "
              f"({native['train_s'] / builtin['train_s']:.1f}x the time)")
        native = _child("ms", slow_args, {"MS_DIFFUSION_ONEDNN_ISA": "native"})
        print(f"oneDNN ISA, our kernels: train step {ours['train_s'] * 1000:.0f} ms with the AVX2 cap, "
              f"{native['train_s'] * 1000:.0f} ms without it ({native['train_s'] / ours['train_s']:.1f}x the time)")


if __name__ == "__main__":
    main()
