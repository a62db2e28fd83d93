"""``python train.py [--config X.yaml] [--set section.key=value ...] [--resume]``."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import yaml

from ms_diffusion.cli.common import add_runtime_args, make_parser, run_command
from ms_diffusion.runtime import peak_rss_gb

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("train.py", "Train a diffusion model or an autoencoder (first stage of a latent diffusion). "
                                "With no arguments: the default Fashion-MNIST config.")
    p.add_argument("--config", default=None,
                   help="YAML config: a path or the name of a shipped config in configs/ (default: fashion_mnist_fast)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=2e-4 (repeatable)")
    p.add_argument("--data-dir", default=None, help="dataset folder (overrides data.data_dir)")
    p.add_argument("--out-dir", default=None, help="run folder for checkpoints, logs and samples (default runs/<name>)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue from CKPT, or from the newest checkpoint in the run folder if no path is given")
    p.add_argument("--steps", type=int, default=None, help="number of optimizer updates (overrides train.num_steps)")
    p.add_argument("--batch-size", type=int, default=None, help="per-device batch size (overrides train.batch_size)")
    p.add_argument("--amp", default=None, choices=("O0", "O1", "O2", "O3"), help="mixed precision level")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to log.jsonl)")
    add_runtime_args(p)
    return p


def _overrides(args: argparse.Namespace) -> List[str]:
    out = list(args.overrides)
    for flag, key in (("data_dir", "data.data_dir"), ("out_dir", "out_dir"), ("steps", "train.num_steps"),
                      ("batch_size", "train.batch_size"), ("amp", "train.amp"), ("seed", "seed"),
                      ("device", "device"), ("mode", "mode")):
        value = getattr(args, flag)
        if value is not None:
            out.append(f"{key}={value}")
    if args.no_progress:
        out.append("train.progress=false")
    return out


def _prepare_run_folder(cfg, n_params: int, source, info, dist) -> None:
    """Write the resolved config into the run folder and print what is about to be trained (rank 0)."""
    out_dir = cfg.run_dir
    if dist.rank != 0:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    print(f"{cfg.name}: {n_params / 1e6:.2f}M parameters on {info.device} ({info.mode} mode"
          f"{', oneDNN ISA ' + info.onednn_isa if info.onednn_isa else ''}), {dist.world_size} worker(s)")
    print(f"data: {source.describe() if hasattr(source, 'describe') else source}")
    print(f"run folder: {out_dir}")


def _train_autoencoder(cfg, args: argparse.Namespace, info, dist) -> int:
    from ms_diffusion.config import build_autoencoder_loss, build_data_source, build_model
    from ms_diffusion.training.autoencoder import AutoencoderTrainer

    autoencoder = build_model(cfg)
    loss = build_autoencoder_loss(cfg)
    source = build_data_source(cfg, autoencoder, shard_id=dist.rank, num_shards=dist.world_size)
    n_params = sum(int(p.size) for p in autoencoder.trainable_params() + loss.discriminator.trainable_params())
    _prepare_run_folder(cfg, n_params, source, info, dist)
    trainer = AutoencoderTrainer(autoencoder, loss, source, cfg.train, cfg.run_dir, meta={"config": cfg.to_dict()},
                                 seed=cfg.seed, rank=dist.rank, world_size=dist.world_size,
                                 grad_reducer=dist.grad_reducer)
    summary = trainer.fit(resume=args.resume)
    if dist.rank == 0:
        print(f"done: step {summary['step']}, reconstruction L1 {summary['rec_loss']:.4f}, "
              f"{summary['img_per_s']:.1f} img/s, peak RSS {peak_rss_gb():.1f} GB; reconstructions in "
              f"{cfg.run_dir / 'reconstructions'}, checkpoints in {cfg.run_dir / 'checkpoints'}")
    return 0


def _measure_latent_scale(cfg, diffusion) -> float:
    """scale_by_std: set the latent diffusion's scale_factor from the first batch of the unsharded data
    (the same on every rank); a resumed run then replaces it with the checkpoint's value."""
    import numpy as np
    from mindspore import Tensor

    from ms_diffusion.config import build_data_source

    images, _ = next(iter(build_data_source(cfg, diffusion).epoch(0, cfg.train.batch_size)))
    noise = np.random.default_rng([cfg.seed, 2]).standard_normal(diffusion.latent_shape(images.shape[0]))
    return diffusion.measure_scale_factor(images, Tensor(noise.astype(np.float32)))


def _run(args: argparse.Namespace) -> int:
    from ms_diffusion import runtime
    from ms_diffusion.config import build_data_source, build_diffusion, load_config
    from ms_diffusion.training.distributed import init_data_parallel

    cfg = load_config(args.config, _overrides(args))
    info = runtime.setup(cfg.device, cfg.mode, cfg.seed)
    dist = init_data_parallel()
    if cfg.is_autoencoder:
        return _train_autoencoder(cfg, args, info, dist)
    diffusion = build_diffusion(cfg)
    ema_diffusion = build_diffusion(cfg)
    source = build_data_source(cfg, diffusion, shard_id=dist.rank, num_shards=dist.world_size)
    out_dir = cfg.run_dir
    _prepare_run_folder(cfg, sum(int(p.size) for p in diffusion.trainable_params()), source, info, dist)
    meta = {"config": cfg.to_dict()}
    if getattr(diffusion, "first_stage_info", None):   # latent diffusion: what rebuilds its first stage
        meta["first_stage"] = diffusion.first_stage_info
    if getattr(diffusion, "scale_by_std", False):
        scale = _measure_latent_scale(cfg, diffusion)
        if dist.rank == 0:
            print(f"scale_by_std: scale_factor = {scale:.4f} (1 / std of the first batch's latents)")

    from ms_diffusion.pipeline import generate
    from ms_diffusion.training import Trainer
    from ms_diffusion.training.evaluation import build_evaluator

    num_classes = getattr(diffusion, "num_classes", None)

    def sample_fn(ema, n):
        """Training-time grid: classes in turn (guided by sample.guidance_scale) for class-conditional models."""
        classes = [i % num_classes for i in range(n)] if num_classes else None
        return generate(ema, n, batch_size=n, seed=cfg.sample.seed, classes=classes,
                        **cfg.sample.generate_options(bool(num_classes))).images

    evaluator = build_evaluator(cfg, diffusion, log=print) if dist.rank == 0 else None
    trainer = Trainer(diffusion, ema_diffusion, source, cfg.train, out_dir, meta=meta,
                      seed=cfg.seed, rank=dist.rank, world_size=dist.world_size, grad_reducer=dist.grad_reducer(
                          diffusion.trainable_params()), sample_fn=sample_fn, evaluate_fn=evaluator)
    summary = trainer.fit(resume=args.resume)
    if dist.rank == 0:
        print(f"done: step {summary['step']}, loss {summary['loss']:.4f}, {summary['img_per_s']:.1f} img/s, "
              f"{summary['overflows']} skipped overflow step(s), peak RSS {peak_rss_gb():.1f} GB; "
              f"checkpoints in {out_dir / 'checkpoints'}")
        best = summary.get("best_eval")
        if best:
            print(f"best: FD {best['fd']:.3f} at step {best['step']} ({best['num']} samples, {best['features']}) "
                  f"-> {out_dir / 'best.safetensors'}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return run_command(_run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
