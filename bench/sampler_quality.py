#!/usr/bin/env python
"""Sample quality versus network evaluations for each sampler (issue 4's "quality per step" table).

    python bench/sampler_quality.py --ckpt runs/fashion_mnist_fast --num 1000
    python bench/sampler_quality.py --ckpt runs/tmp_for_bench --num 200 --configs ddim-20,dpmpp-10

For every configuration (default: DDPM-1000, DDIM-50, DDIM-20, PLMS-20, DPM-Solver++-20,
DPM-Solver++-10) it generates ``--num`` images from one seed with ``pipeline.generate`` (the code
behind ``sample.py --sampler S --steps N``), then measures

* the Fréchet distance to the real Fashion-MNIST train split in the feature space of the
  project's classifier (``ms_diffusion.metrics``), with a bootstrap standard deviation (resampling
  the generated set; the noise of a finite sample set, the reference held fixed),
* wall time per image (generation only, after a one-batch warm-up that compiles the graph).

Every configuration starts from the same initial noise (same seed, same batch size), so the
differences between rows are the samplers', not the noise's. Prints a Markdown table and
writes it with the raw numbers as JSON (``--json``). The FD's bias grows as the sample count
shrinks: compare rows of one run only, and state the count (the table does).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import ms_diffusion  # noqa: F401  (CPU workaround before MindSpore makes kernels)
from ms_diffusion.cli.common import add_runtime_args, make_parser, run_command

DEFAULT_CONFIGS = "ddpm-1000,ddim-50,ddim-20,plms-20,dpmpp-20,dpmpp-10"
_TITLES = {"ddpm": "DDPM", "ddim": "DDIM", "plms": "PLMS", "dpmpp": "DPM-Solver++"}


def parse_configs(spec: str) -> List[Tuple[str, int]]:
    """``"ddpm-1000,dpmpp-20"`` -> [("ddpm", 1000), ("dpmpp", 20)]."""
    from ms_diffusion.samplers import resolve_sampler

    out = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        name, _, steps = item.rpartition("-")
        if not name or not steps.isdigit() or int(steps) < 1:
            raise ValueError(f"bad configuration {item!r}; expected SAMPLER-STEPS, e.g. dpmpp-20")
        out.append((resolve_sampler(name), int(steps)))
    if not out:
        raise ValueError("no sampler configuration given")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("sampler_quality.py", "Fréchet distance (classifier features) and time per image per sampler.")
    p.add_argument("--ckpt", required=True, help="a Fashion-MNIST run folder or checkpoint (python train.py)")
    p.add_argument("--weights", default="ema", choices=("ema", "online"))
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"SAMPLER-STEPS list (default {DEFAULT_CONFIGS})")
    p.add_argument("--num", type=int, default=1000, help="images per configuration (default 1000)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=50, help="bootstrap rounds for the FD's standard deviation")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: found automatically)")
    p.add_argument("--classifier-weights", default=None, help="feature classifier (default: the shipped one)")
    p.add_argument("--json", default=None, help="write the table and raw numbers here")
    p.add_argument("--save-samples", default=None, help="folder for one .npz of images per configuration")
    p.add_argument("--no-progress", action="store_true")
    add_runtime_args(p)
    return p


def _run(args: argparse.Namespace) -> int:
    import numpy as np

    from ms_diffusion import runtime
    from ms_diffusion.metrics import classifier_extractor, reference_features
    from ms_diffusion.metrics.frechet import bootstrap_frechet_distance, frechet_distance_from_features
    from ms_diffusion.pipeline import generate, load_diffusion

    configs = parse_configs(args.configs)
    info = runtime.setup(args.device or "auto", args.mode or "graph", seed=args.seed)
    _, diffusion, meta = load_diffusion(args.ckpt, args.weights)
    if getattr(diffusion, "num_classes", None) is not None:
        raise ValueError("this benchmark is for unconditional models; the checkpoint is class-conditional")
    extractor = classifier_extractor(args.classifier_weights)
    ref = reference_features(extractor, "fashion_mnist", data_dir=args.data_dir, log=print)
    if args.num <= extractor.dim:
        raise ValueError(f"--num must exceed the feature dimension ({extractor.dim}) for the covariance")
    batch = min(args.batch_size, args.num)
    rows: List[Dict] = []
    print(f"checkpoint {meta['path']} (step {meta.get('step')}, {args.weights} weights); {args.num} images per "
          f"configuration; reference {ref.describe()}; features {extractor.key}; device {info.device}")
    for name, steps in configs:
        generate(diffusion, batch, batch_size=batch, seed=args.seed, sampler=name, steps=min(steps, 2))  # compile
        start = time.perf_counter()
        out = generate(diffusion, args.num, batch_size=batch, seed=args.seed, sampler=name, steps=steps,
                       progress=not args.no_progress)
        seconds = time.perf_counter() - start
        feats = extractor(out.images)
        fd = frechet_distance_from_features(feats, ref.stats).value
        sd, _ = bootstrap_frechet_distance(feats, ref.stats, rounds=args.bootstrap, seed=args.seed)
        row = {"sampler": name, "steps": steps, "nfe": steps, "fd": fd, "fd_bootstrap_sd": sd,
               "ms_per_image": seconds / args.num * 1000, "num": args.num}
        rows.append(row)
        print(f"{_TITLES[name]}-{steps}: FD {fd:.3f} ± {sd:.3f}, {row['ms_per_image']:.0f} ms/image", flush=True)
        if args.save_samples:
            folder = Path(args.save_samples)
            folder.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(folder / f"{name}-{steps}.npz", images=out.images, seed=args.seed)
    base = next((r["fd"] for r in rows if r["sampler"] == "ddpm"), None)
    lines = [f"| sampler | NFE | FD (classifier features, N={args.num}) | vs DDPM | ms / image |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        rel = f"{(r['fd'] / base - 1) * 100:+.0f}%" if base else "—"
        lines.append(f"| {_TITLES[r['sampler']]} | {r['nfe']} | {r['fd']:.3f} ± {r['fd_bootstrap_sd']:.3f} | {rel} | "
                     f"{r['ms_per_image']:.0f} |")
    table = "\n".join(lines)
    print()
    print(table)
    print(f"\n± = bootstrap standard deviation over {args.bootstrap} resamplings of the {args.num} generated images; "
          f"reference: {ref.describe()}, features {extractor.key}; checkpoint {meta['path']} step {meta.get('step')}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "table": table, "checkpoint": meta["path"],
                                               "step": meta.get("step"), "features": extractor.key,
                                               "reference": ref.describe(), "device": info.device}, indent=2))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return run_command(_run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
