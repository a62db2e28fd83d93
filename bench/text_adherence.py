#!/usr/bin/env python
"""Prompt adherence of a text-conditional model trained on captioned Fashion-MNIST
(configs/ldm_fashion_mnist_text.yaml).

    python bench/text_adherence.py --ckpt runs/ldm_fashion_mnist_text --per-prompt 10 --guidance 1,3

For every one of the 40 prompts (10 classes x black on white / white on black x upright / upside down) it
generates ``--per-prompt`` images at each guidance scale and prints, per prompt and over all prompts, the
share of images whose class (the shipped classifier, with the prompt's attributes undone), colours (the
border) and orientation (which way up the classifier is more confident) match the prompt, and all three
at once (``ms_diffusion.metrics.captions``). The same checks on real captioned test images give the
ceiling the checks allow; chance is 10 % for the class, 50 % for each attribute, 2.5 % for all three.
``--grid`` writes the first image of each prompt, a row per class. ``--json`` keeps the numbers.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def real_ceiling(n: int, data_dir) -> dict:
    from ms_diffusion.data import build_source
    from ms_diffusion.metrics.captions import adherence, adherence_table

    src = build_source("fashion_mnist_captions", data_dir=data_dir, split="test", seed=0, num_workers=2)
    indices = np.arange(min(n, src.total_samples))
    images, captions = [], []
    start = 0
    for batch, labels in src.images_at(indices, batch_size=500):
        images.append(batch)
        captions += src.batch_captions(indices[start:start + len(batch)], labels)
        start += len(batch)
    return adherence_table(adherence(np.concatenate(images), captions))["all prompts"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--per-prompt", type=int, default=10)
    p.add_argument("--guidance", default="1,3", help="guidance scales, comma-separated")
    p.add_argument("--sampler", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--real", type=int, default=2000, help="real test images for the checks' ceiling (0: skip)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--grid", default=None, help="write a grid (first guidance scale != 1): a row per class")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from ms_diffusion import runtime
    from ms_diffusion.data.fashion_mnist_captions import all_prompts
    from ms_diffusion.imageio import save_grid
    from ms_diffusion.metrics.captions import adherence, adherence_table
    from ms_diffusion.pipeline import generate, load_diffusion

    runtime.setup("auto", "graph")
    cfg, ldm, meta = load_diffusion(args.ckpt)
    prompts = all_prompts()
    per = args.per_prompt
    wanted = [q for q in prompts for _ in range(per)]
    results = {"ckpt": meta["path"], "step": meta.get("step"), "per_prompt": per, "guidance": {}}
    print(f"{meta['path']} (step {meta.get('step')}): {len(prompts)} prompts x {per} images per guidance scale")
    if args.real:
        ceiling = real_ceiling(args.real, args.data_dir)
        results["real"] = ceiling
        print(f"checks on {ceiling['n']} real captioned test images (their ceiling): class {ceiling['class']:.1%}, "
              f"colour {ceiling['colour']:.1%}, orientation {ceiling['orientation']:.1%}, all {ceiling['all']:.1%}")
    tables = {}
    for w in (float(v) for v in args.guidance.split(",")):
        t0 = time.perf_counter()
        out = generate(ldm, len(wanted), batch_size=min(cfg.sample.batch_size, 80), seed=args.seed,
                       sampler=args.sampler or cfg.sample.sampler, steps=args.steps or cfg.sample.steps,
                       guidance_scale=w, prompts=wanted)
        seconds = time.perf_counter() - t0
        table = adherence_table(adherence(out.images, wanted))
        tables[w] = table
        results["guidance"][str(w)] = {"seconds": seconds, "table": table}
        total = table["all prompts"]
        print(f"guidance {w:g}: class {total['class']:.1%}, colour {total['colour']:.1%}, orientation "
              f"{total['orientation']:.1%}, all three {total['all']:.1%} ({len(wanted)} images, {seconds:.0f} s)")
        if args.grid and w != 1.0 and not Path(args.grid).exists():
            save_grid(out.images[::per], args.grid, nrow=4, scale=2)     # the first image of each prompt
            print(f"grid (rows: classes; columns: white on black upright, upside down, black on white upright, "
                  f"upside down) -> {args.grid}")
    print(f"\n{'prompt':48s}" + "".join(f"{'all @ w=' + format(w, 'g'):>12s}" for w in tables))
    for q in prompts:
        print(f"{q:48s}" + "".join(f"{tables[w][q]['all']:12.0%}" for w in tables))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
