#!/usr/bin/env python
"""Full training loop (data pipeline, host noise, EMA, logging) vs the bare compiled train step.

    python bench/train_loop.py                       # the default config, 60 updates
    python bench/train_loop.py --config fashion_mnist_tutorial --steps 40

Shows how much the input pipeline and the loop cost on top of the network: prints img/s of the
data pipeline alone, of the bare step on one fixed batch, and of ``Trainer.fit`` on real data.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import ms_diffusion  # noqa: F401  (CPU workaround first)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()

    import numpy as np
    from mindspore import Tensor

    from ms_diffusion import runtime
    from ms_diffusion.config import load_config
    from ms_diffusion.experiment import build_data_source, build_diffusion
    from ms_diffusion.training import Trainer

    overrides = [f"train.num_steps={args.steps}", "train.warmup_steps=0", "train.sample_every=0",
                 "train.export_safetensors=false", f"train.save_every={args.steps}", "train.progress=false",
                 "train.log_every=10"] + args.overrides
    cfg = load_config(args.config, overrides)
    runtime.setup(cfg.device, "graph", cfg.seed)
    bs = cfg.train.batch_size

    diffusion, ema = build_diffusion(cfg), build_diffusion(cfg)
    source = build_data_source(cfg, diffusion)
    t0 = time.perf_counter()
    n = 0
    for images, _ in source.epoch(0, bs):
        n += len(images)
        if n >= 50 * bs:
            break
    data_ips = n / (time.perf_counter() - t0)

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(diffusion, ema, source, cfg.train, tmp, seed=cfg.seed)
        images, labels = next(source.epoch(0, bs))
        inputs = diffusion.training_inputs(images, np.random.default_rng(0),
                                           labels if trainer.conditional else None)
        cls = Tensor(inputs["classes"]) if inputs["classes"] is not None else None
        batch = (Tensor(images), Tensor(inputs["times"]), Tensor(inputs["noise"]), cls, False, None)
        trainer.step_fn(*batch)[0].asnumpy()                 # compile
        t0 = time.perf_counter()
        k = max(args.steps // 3, 5)
        for _ in range(k):
            loss = trainer.step_fn(*batch)[0]
        loss.asnumpy()
        bare_ips = k * bs / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        trainer.fit()
        loop_ips = args.steps * bs / (time.perf_counter() - t0)
        logged = [json.loads(l)["img_per_s"] for l in (Path(tmp) / "log.jsonl").read_text().splitlines()][1:]

    print(f"config {cfg.name}: batch {bs}, {sum(int(p.size) for p in diffusion.trainable_params()) / 1e6:.2f}M params")
    print(f"data pipeline alone        {data_ips:10.0f} img/s")
    print(f"bare train step            {bare_ips:10.1f} img/s")
    print(f"full loop (Trainer.fit)    {loop_ips:10.1f} img/s   ({loop_ips / bare_ips:.0%} of the bare step; includes "
          f"checkpoint + loss plot once)")
    if logged:
        print(f"full loop, steady state    {np.median(logged):10.1f} img/s   (median of the logged windows)")


if __name__ == "__main__":
    main()
