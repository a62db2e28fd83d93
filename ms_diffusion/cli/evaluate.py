"""``python evaluate.py --samples DIR|FILE.npz --dataset fashion-mnist [--metric fd,kid,pr,memorization] [--num N]``.

Or ``--ckpt RUN`` to generate ``--num`` samples with ``--sampler``/``--steps`` first (a text-conditional
run cycles ``--prompt``s, else its ``sample.prompts``, else its training data's example prompts), scored
against that run's training data unless ``--dataset`` says otherwise. Prints one table: metric, value,
sample count, reference. See docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional

from ms_diffusion.cli.common import (UsageError, add_prompt_args, add_runtime_args, generation_options, make_parser,
                                     read_prompts, refuse_text_args, run_command)
from ms_diffusion.cli.outputs import check_distinct, check_output_file

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("evaluate.py", "Score generated images against a dataset: Fréchet distance (classifier "
                    "features, or FID with Inception-v3 weights you supply), KID, precision/recall, memorisation.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--samples", help="a folder of image files or an .npz with 'images' (N, C, H, W) in [0, 1] "
                                       "(sample.py --npz)")
    src.add_argument("--ckpt", help="a run folder or checkpoint: generate --num samples from it, then evaluate")
    p.add_argument("--dataset", default=None,
                   help="the real data to compare with (default: with --ckpt the run's training data, else "
                        "fashion-mnist)")
    p.add_argument("--data-dir", default=None, help="the dataset's folder (default: the run's with --ckpt, else found "
                                                    "like train.py finds it)")
    p.add_argument("--metric", default="fd,kid,pr,memorization",
                   help="comma-separated: fd, kid, pr, memorization, or all (default all)")
    p.add_argument("--num", type=int, default=None,
                   help="number of samples: the first N of --samples (default all), or how many --ckpt generates "
                        "(default 1000)")
    p.add_argument("--features", default="classifier", choices=("classifier", "inception"),
                   help="feature space: the project's Fashion-MNIST classifier (default) or FID Inception-v3")
    p.add_argument("--classifier-weights", default=None,
                   help="classifier checkpoint (default: the shipped ms_diffusion/metrics/weights/fmnist_classifier.ckpt)")
    p.add_argument("--inception-weights", default=None,
                   help="converted FID Inception checkpoint (scripts/convert_fid_inception.py); needed for "
                        "--features inception")
    p.add_argument("--max-reference", type=int, default=None,
                   help="use a fixed random subset of this many real training images (default: all)")
    p.add_argument("--bootstrap", type=int, default=20,
                   help="bootstrap rounds for the Fréchet distance's standard deviation (0 = off; default 20)")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--memo-threshold", type=float, default=None,
                   help="memorisation: RMS pixel distance below which a sample counts as a copy (default: the 1st "
                        "percentile of held-out test images' distances)")
    p.add_argument("--no-cache", action="store_true", help="recompute reference statistics and do not write them")
    p.add_argument("--json", default=None, help="also write the result as JSON to this file")
    p.add_argument("--seed", type=int, default=0, help="seed of subsets (and of generation with --ckpt)")
    g = p.add_argument_group("generation (with --ckpt)")
    g.add_argument("--weights", default="ema", choices=("ema", "online"))
    g.add_argument("--sampler", default=None,
                   help="ddpm, ddim, plms, dpmpp, dpmpp_sde, euler, euler_a, heun or unipc (default: the checkpoint "
                        "config's)")
    g.add_argument("--steps", type=int, default=None, help="network evaluations (default: the config's)")
    g.add_argument("--eta", type=float, default=None)
    g.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance weight for a class- or text-conditional model (default: the "
                        "config's sample.guidance_scale; 1 = off); the classes (or prompts) are generated in turn")
    g.add_argument("--guidance-rescale", type=float, default=None, help="guidance rescale phi, 0 = off")
    add_prompt_args(g)
    g.add_argument("--batch-size", type=int, default=100, help="images per network batch")
    g.add_argument("--save-npz", default=None, help="also write the generated images to this .npz")
    add_runtime_args(p)
    return p


def _run(args: argparse.Namespace) -> int:
    from ms_diffusion import runtime
    from ms_diffusion.metrics.evaluate import evaluate_samples, format_table, open_samples, parse_metrics

    for name in ("num", "steps", "batch_size", "max_reference", "kid_subsets", "kid_subset_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.bootstrap < 0 or args.bootstrap == 1:
        raise UsageError(f"--bootstrap must be 0 or >= 2, got {args.bootstrap}")
    metrics = parse_metrics(args.metric)
    if args.json:
        check_output_file(args.json, "--json", "json")   # before the work, not after it
    if args.save_npz:
        check_output_file(args.save_npz, "--save-npz", "npz")
    check_distinct({"--json": args.json, "--save-npz": args.save_npz})
    if args.features == "inception" and args.inception_weights is None:
        raise UsageError("--features inception needs --inception-weights FILE (convert pytorch-fid's weights with "
                         "scripts/convert_fid_inception.py; see docs/evaluation.md)")
    weights = args.inception_weights if args.features == "inception" else args.classifier_weights
    runtime.setup(args.device or "auto", args.mode or "graph", seed=args.seed)
    source, dataset, data_dir = args.samples, args.dataset or "fashion-mnist", args.data_dir
    prompts = read_prompts(args)
    if not args.ckpt and (prompts or args.negative_prompt is not None):
        raise UsageError("--prompt / --prompts-file / --negative-prompt are for generating with --ckpt")
    if args.ckpt:
        import numpy as np

        from ms_diffusion.pipeline import cycled_classes, cycled_prompts, generate, load_diffusion

        num = args.num or 1000
        cfg, diffusion, meta = load_diffusion(args.ckpt, args.weights)
        if args.dataset is None:
            dataset, data_dir = cfg.data["name"], args.data_dir or cfg.data.get("data_dir")
        text = getattr(diffusion, "text_conditional", False)
        refuse_text_args(prompts, args.negative_prompt, text)
        if text and not prompts:
            prompts = _run_prompts(cfg, diffusion)
        per_image = cycled_prompts(num, prompts) if text else None
        classes = None if text else cycled_classes(num, getattr(diffusion, "num_classes", None))
        sampling = generation_options(args, cfg.sample, classes, text, per_image)
        start = time.perf_counter()
        out = generate(diffusion, num, batch_size=min(args.batch_size, num), seed=args.seed, classes=classes,
                       progress=True, **sampling)
        elapsed = time.perf_counter() - start
        images = out.images
        guided = (f", guidance {sampling['guidance_scale']:g}" if classes is not None or text else "") + (
            f", {len(prompts)} prompt(s) in turn" if text else "")
        print(f"generated {num} images from {meta['path']} (step {meta.get('step')}, {args.weights} weights, "
              f"sampler {sampling['sampler'] or 'default'}, steps {sampling['steps'] or 'default'}{guided}) in "
              f"{elapsed:.1f} s ({elapsed / num * 1000:.0f} ms/image)")
        if args.save_npz:
            Path(args.save_npz).expanduser().parent.mkdir(parents=True, exist_ok=True)
            extra = {"prompts": np.asarray(per_image)} if text else {}
            np.savez_compressed(Path(args.save_npz).expanduser(), images=images, seed=args.seed, **extra)
        source = meta["path"]
    else:
        images = open_samples(args.samples, limit=args.num)   # read in chunks while evaluating
        if args.num is not None and len(images) < args.num:
            print(f"note: {args.samples} holds only {len(images)} images (asked for {args.num})")
    result = evaluate_samples(images, dataset, metrics=metrics, features=args.features, weights=weights,
                              data_dir=data_dir, max_reference=args.max_reference, bootstrap=args.bootstrap,
                              kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
                              memorization_threshold=args.memo_threshold, seed=args.seed,
                              use_cache=not args.no_cache, log=print)
    print(f"samples: {source} ({result['num_samples']} images)")
    print(format_table(result))
    if args.json:
        Path(args.json).expanduser().parent.mkdir(parents=True, exist_ok=True)
        with open(Path(args.json).expanduser(), "w") as f:
            json.dump(dict(result, samples=str(source)), f, indent=2)
    return 0


def _run_prompts(cfg, diffusion) -> List[str]:
    """A text-conditional run's own prompts: its sample.prompts, else its training data's example prompts."""
    from ms_diffusion.data import DataError
    from ms_diffusion.experiment import build_data_source, run_prompts

    if cfg.sample.prompts:
        return list(cfg.sample.prompts)
    try:
        return run_prompts(cfg, build_data_source(cfg, diffusion))
    except DataError as err:
        raise UsageError(f"this model is text-conditional and its config has no sample.prompts; its training data "
                         f"would give example prompts but cannot be read ({err}). Give --prompt (repeat for "
                         f"several) or --prompts-file") from None


def main(argv: Optional[List[str]] = None) -> int:
    return run_command(_run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
