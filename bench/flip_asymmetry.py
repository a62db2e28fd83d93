#!/usr/bin/env python
"""How mirror-symmetric each class of a dataset is: why the default config trains without random flips.

    python bench/flip_asymmetry.py                        # Fashion-MNIST train split
    python bench/flip_asymmetry.py --dataset mnist --split test

For every class: the share of its images that lie closer (squared pixel distance) to the class's mean image
than their left-right mirror images do, and the asymmetry of the mean image itself,
``sum |m - mirror(m)| / sum |m|``. A class whose objects appear either way round scores near 0.5 / 0; one
whose objects all face the same way scores near 1 on the first, and random horizontal flips then teach a
model images its data does not contain (Fashion-MNIST's sneakers, sandals and ankle boots).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ms_diffusion.cli.common import make_parser, run_command  # noqa: E402
from ms_diffusion.metrics.data import load_dataset_arrays  # noqa: E402

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")


def class_asymmetry(images: np.ndarray, labels: np.ndarray) -> list:
    """Per class (ascending label): (label, count, share closer to the mean than the mirror, mean-image asymmetry).
    ``images`` (N, C, H, W), ``labels`` (N,)."""
    rows = []
    for label in np.unique(labels):
        x = images[labels == label]
        mean = x.mean(0)
        own = ((x - mean) ** 2).sum(axis=(1, 2, 3))
        mirrored = ((x[..., ::-1] - mean) ** 2).sum(axis=(1, 2, 3))
        asym = float(np.abs(mean - mean[..., ::-1]).sum() / max(np.abs(mean).sum(), 1e-12))
        rows.append((int(label), len(x), float(np.mean(own < mirrored)), asym))
    return rows


def main(args: argparse.Namespace) -> int:
    data = load_dataset_arrays(args.dataset, args.split, data_dir=args.data_dir)
    names = FASHION_MNIST_CLASSES if args.dataset.replace("-", "_") == "fashion_mnist" else None
    print(f"{args.dataset} {args.split}: {len(data.images)} images\n")
    print("| class | images | closer to the class mean than mirrored | mean image asymmetry |")
    print("|---|---:|---:|---:|")
    for label, n, share, asym in class_asymmetry(data.images, np.asarray(data.labels)):
        name = f"{label} {names[label]}" if names else str(label)
        print(f"| {name} | {n} | {share * 100:.1f} % | {asym:.3f} |")
    return 0


if __name__ == "__main__":
    parser = make_parser("flip_asymmetry.py", __doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--split", default="train")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    raise SystemExit(run_command(main, parser))
