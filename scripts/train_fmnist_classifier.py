#!/usr/bin/env python
"""Train the Fashion-MNIST classifier whose penultimate layer is evaluate.py's offline feature space.

    python scripts/train_fmnist_classifier.py                      # -> ms_diffusion/metrics/weights/fmnist_classifier.ckpt
    python scripts/train_fmnist_classifier.py --out my_cls.ckpt --epochs 3

Trains on the real Fashion-MNIST train split (found like train.py finds it: --data-dir, ./data,
the Debian package ``dataset-fashion-mnist``, or the download), reports top-1 accuracy on the
test split, and writes a MindSpore checkpoint atomically (a temporary file renamed into place)
with the architecture, accuracy, training time and data origin in its metadata. The default
setting (3 epochs, batch 128, Adam 2e-3 with cosine decay, seed 0) takes about ten minutes on 2
CPU cores. A checkpoint with different weights has a different SHA-256, so reference statistics
cached for the old one are not reused (see docs/evaluation.md).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional

import ms_diffusion  # noqa: F401  (CPU workaround before MindSpore makes kernels)
from ms_diffusion.cli.common import add_runtime_args, make_parser, run_command


def build_parser() -> argparse.ArgumentParser:
    from ms_diffusion.metrics.classifier import SHIPPED_CLASSIFIER

    p = make_parser("train_fmnist_classifier.py", "Train the Fashion-MNIST feature classifier used by evaluate.py.")
    p.add_argument("--out", default=str(SHIPPED_CLASSIFIER), help="checkpoint to write (default: the shipped one)")
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files (default: auto)")
    p.add_argument("--epochs", type=float, default=3.0, help="passes over the 60,000 training images")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3, help="peak Adam learning rate (cosine decay to 1%%)")
    p.add_argument("--widths", default="24,48,96", help="channels of the three stages (the last is the feature dim)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-accuracy", type=float, default=0.90,
                   help="refuse to write a checkpoint whose test accuracy is below this (default 0.90)")
    add_runtime_args(p)
    return p


def _run(args: argparse.Namespace) -> int:
    from ms_diffusion import runtime
    from ms_diffusion.io.hashing import file_sha256
    from ms_diffusion.metrics.classifier import ClassifierConfig, accuracy, save_classifier
    from ms_diffusion.training.classifier import train_classifier
    from ms_diffusion.metrics.data import load_dataset_arrays

    widths = tuple(int(w) for w in args.widths.split(","))
    if len(widths) != 3 or min(widths) < 1:
        raise ValueError(f"--widths must be three positive ints, got {args.widths!r}")
    info = runtime.setup(args.device or "auto", args.mode or "graph", seed=args.seed)
    train = load_dataset_arrays("fashion_mnist", "train", data_dir=args.data_dir)
    test = load_dataset_arrays("fashion_mnist", "test", data_dir=args.data_dir)
    print(f"Fashion-MNIST: {len(train.images)} train / {len(test.images)} test images from {train.origin}; "
          f"device {info.device}, {info.mode} mode")
    start = time.perf_counter()
    net, history = train_classifier(train.images, train.labels, config=ClassifierConfig(widths=widths),
                                    epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    seconds = time.perf_counter() - start
    test_acc = accuracy(net, test.images, test.labels)
    train_acc = accuracy(net, train.images[:10000], train.labels[:10000])
    print(f"trained in {seconds:.0f} s: test accuracy {test_acc:.4f} (10,000 images), "
          f"train accuracy {train_acc:.4f} (first 10,000)")
    if test_acc < args.min_accuracy:
        raise ValueError(f"test accuracy {test_acc:.4f} is below --min-accuracy {args.min_accuracy}; train longer "
                         f"(--epochs) or lower the bar; nothing written")
    meta = {"test_accuracy": test_acc, "train_accuracy_first_10k": train_acc, "train_seconds": round(seconds, 1),
            "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
            "data": {"train": train.fingerprint, "test": test.fingerprint}, "device": info.device,
            "loss_history": history}
    path = save_classifier(net, Path(args.out), meta)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB, sha256 {file_sha256(path)[:16]})")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return run_command(_run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
