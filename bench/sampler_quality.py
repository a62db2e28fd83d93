#!/usr/bin/env python
"""Sample quality versus network evaluations for each sampler (issue 4's "quality per step" table).

    python bench/sampler_quality.py --ckpt runs/fashion_mnist_fast --num 1000
    python bench/sampler_quality.py --ckpt runs/tmp_for_bench --num 200 --configs ddim-20,dpmpp-10:order=3

For every configuration (default: DDPM-1000, DDIM-50, DDIM-20, PLMS-20, DPM-Solver++-20 and -10,
each also with Karras sigmas) it generates ``--num`` images from one seed with ``pipeline.generate`` (the code
behind ``sample.py --sampler S --steps N``), then measures

* the Fréchet distance to the real Fashion-MNIST train split in the feature space of the
  project's classifier (``ms_diffusion.metrics``), with a bootstrap standard deviation (resampling
  the generated set; the noise of a finite sample set, the reference held fixed),
* wall time per image (generation only, after a one-batch warm-up that compiles the graph).

Every configuration starts from the same initial noise (same seed, same batch size), so image i
of every row comes from the same noise. The distance relative to two base rows gets a paired
bootstrap (one resampling of image indices applied to every row): against DDPM-1000, whose
ancestral noise makes its images independent of the deterministic samplers', the spread stays
about the rows' own; against the deterministic sampler with the most steps (DDIM-50), which maps
the same noise to nearly the same images as the other ODE solvers, the shared noise cancels
and differences of a few percent are resolved. PLMS evaluates the network steps + 1 times (its
first step is a Heun step); the NFE column says so. A configuration may carry sampler options,
``dpmpp-20:karras=true``. Prints a Markdown table and writes it with the raw numbers as JSON
(``--json``). The FD's bias grows as the sample count shrinks: compare rows of one run only,
and state the count (the table does).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import ms_diffusion  # noqa: F401  (CPU workaround before MindSpore makes kernels)
from ms_diffusion.cli.common import add_runtime_args, make_parser, parse_key_values, run_command

DEFAULT_CONFIGS = "ddpm-1000,ddim-50,ddim-20,plms-20,dpmpp-20,dpmpp-20:karras=true,dpmpp-10,dpmpp-10:karras=true"
_TITLES = {"ddpm": "DDPM", "ddim": "DDIM", "plms": "PLMS", "dpmpp": "DPM-Solver++"}


def parse_configs(spec: str) -> List[Tuple[str, int, Dict[str, Any]]]:
    """``"ddpm-1000,dpmpp-20:karras=true"`` -> [("ddpm", 1000, {}), ("dpmpp", 20, {"karras": True})]."""
    from ms_diffusion.samplers import resolve_sampler

    out = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        head, *options = item.split(":")
        name, _, steps = head.rpartition("-")
        if not name or not steps.isdigit() or int(steps) < 1:
            raise ValueError(f"bad configuration {item!r}; expected SAMPLER-STEPS[:KEY=VALUE...], e.g. dpmpp-20 "
                             f"or dpmpp-20:karras=true")
        out.append((resolve_sampler(name), int(steps), parse_key_values(options, f"configuration {item!r}:")))
    if not out:
        raise ValueError("no sampler configuration given")
    return out


def config_label(name: str, steps: int, options: Dict[str, Any]) -> str:
    """"DPM-Solver++-20" or "DPM-Solver++-20 (karras=True)"."""
    extra = ", ".join(f"{k}={v}" for k, v in options.items())
    return f"{_TITLES[name]}-{steps}" + (f" ({extra})" if extra else "")


def label_slug(label: str) -> str:
    """"DPM-Solver++-20 (karras=True)" -> "dpm-solver++-20_karras=true" (a file name)."""
    return label.lower().replace(" (", "_").replace(", ", "_").replace(")", "")


def ratio_bases(rows: List[Dict]) -> List[int]:
    """Rows the others are compared with: the first DDPM row (ancestral, so its images are not paired
    with the deterministic samplers') and the deterministic sampler with the most evaluations,
    without extra options (paired: the ODE samplers map the same noise to nearly the same image)."""
    bases = [i for i, r in enumerate(rows) if r["sampler"] == "ddpm"][:1]
    ode = [i for i, r in enumerate(rows) if r["sampler"] != "ddpm" and not r["options"]]
    if ode:
        bases.append(max(ode, key=lambda i: (rows[i]["nfe"], -i)))
    return bases


def add_bootstrap(rows: List[Dict], features: List, reference, rounds: int, seed: int) -> List[str]:
    """One paired bootstrap for all rows (``features[k]`` (num, D) is row k's): sets each row's
    ``fd_bootstrap_sd`` and ``vs[label] = (FD / FD_base, bootstrap sd)`` for each base row; returns
    the base labels."""
    from ms_diffusion.metrics.frechet import bootstrap_ratios, paired_bootstrap_distances

    resampled = paired_bootstrap_distances(features, reference, rounds=rounds, seed=seed)
    fds = [r["fd"] for r in rows]
    labels = []
    for k, r in enumerate(rows):
        r["fd_bootstrap_sd"] = float(resampled[:, k].std(ddof=1))
    for base in ratio_bases(rows):
        labels.append(rows[base]["label"])
        for r, ratio in zip(rows, bootstrap_ratios(fds, resampled, base)):
            r.setdefault("vs", {})[labels[-1]] = ratio
    return labels


def format_table(rows: List[Dict], columns: List[str], num: int) -> str:
    """Markdown: sampler, NFE, FD ± sd, FD relative to each base (± paired bootstrap sd), ms per image."""
    head = ["sampler", "NFE", f"FD (classifier features, N={num})"] + [f"vs {c}" for c in columns] + ["ms / image"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for r in rows:
        rel = [f"{(r['vs'][c][0] - 1) * 100:+.0f}% ± {r['vs'][c][1] * 100:.0f}%" if r["label"] != c else "—"
               for c in columns]
        cells = [r["label"] if r["options"] else _TITLES[r["sampler"]], str(r["nfe"]),
                 f"{r['fd']:.3f} ± {r['fd_bootstrap_sd']:.3f}"] + rel + [f"{r['ms_per_image']:,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("sampler_quality.py", "Fréchet distance (classifier features) and time per image per sampler.")
    p.add_argument("--ckpt", required=True, help="a Fashion-MNIST run folder or checkpoint (python train.py)")
    p.add_argument("--weights", default="ema", choices=("ema", "online"))
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help=f"SAMPLER-STEPS[:KEY=VALUE...] list, options as sample.py --option (default {DEFAULT_CONFIGS})")
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
    from ms_diffusion.metrics.frechet import frechet_distance_from_features
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
    features: List[np.ndarray] = []  # (num, D) per row
    print(f"checkpoint {meta['path']} (step {meta.get('step')}, {args.weights} weights); {args.num} images per "
          f"configuration; reference {ref.describe()}; features {extractor.key}; device {info.device}")
    for name, steps, options in configs:
        label = config_label(name, steps, options)
        generate(diffusion, batch, batch_size=batch, seed=args.seed, sampler=name, steps=min(steps, 2),
                 **options)  # compile
        start = time.perf_counter()
        out = generate(diffusion, args.num, batch_size=batch, seed=args.seed, sampler=name, steps=steps,
                       progress=not args.no_progress, **options)
        seconds = time.perf_counter() - start
        feats = extractor(out.images)
        fd = frechet_distance_from_features(feats, ref.stats).value
        features.append(feats)
        rows.append({"label": label, "sampler": name, "steps": steps, "options": options,
                     "nfe": steps + 1 if name == "plms" else steps, "fd": fd,
                     "ms_per_image": seconds / args.num * 1000, "num": args.num})
        print(f"{label}: FD {fd:.3f}, {rows[-1]['ms_per_image']:.0f} ms/image", flush=True)
        if args.save_samples:
            folder = Path(args.save_samples)
            folder.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(folder / f"{label_slug(label)}.npz", images=out.images, seed=args.seed)
    columns = add_bootstrap(rows, features, ref.stats, args.bootstrap, args.seed)
    table = format_table(rows, columns, args.num)
    print()
    print(table)
    print(f"\n± = bootstrap standard deviation over {args.bootstrap} resamplings of the {args.num} generated images "
          f"(the same resampling for every row); reference: {ref.describe()}, features "
          f"{extractor.key}; checkpoint {meta['path']} step {meta.get('step')}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "table": table, "checkpoint": meta["path"],
                                               "step": meta.get("step"), "features": extractor.key,
                                               "reference": ref.describe(), "device": info.device}, indent=2))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return run_command(_run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
