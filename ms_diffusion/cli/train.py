"""``python train.py [--config X.yaml] [--set section.key=value ...] [--resume]``."""
from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, List, Optional, Sequence

import yaml

from ms_diffusion import kernels
from ms_diffusion.cli.common import UsageError, add_runtime_args, make_parser, run_command
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
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in a run folder that holds a previous one, deleting that run's checkpoints, "
                        "exported weights and log (other files stay); without it such a folder is refused")
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


def _kernel_status(device: str) -> str:
    if str(device).upper() != "CPU":
        return ""
    return ", our CPU kernels " + ("on" if kernels.enabled() else "off")


def _fit_in_run_folder(trainer, cfg, args: argparse.Namespace, folder, *, n_params: int, source, info, dist,
                       notes: Sequence[str] = (), tokenizer=None) -> Dict[str, Any]:
    """Claim the run folder (rank 0), resume, write config.yaml (and a text model's tokenizer/, unless a resumed
    run has it), print what is trained, fit, release.

    Everything that can be checked without the folder has been by now; the resumed checkpoint is checked
    against the model before config.yaml is written. A run that fails before its first update leaves the
    folder as it was (``RunFolder.release(restore=True)``)."""
    if folder is not None:
        folder.claim()
    start_step = None
    try:
        trainer.resume(args.resume)   # fit() does not load it again
        start_step = trainer.step
        if folder is not None:
            folder.write_config(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            if tokenizer is not None:
                from ms_diffusion.experiment import run_tokenizer_folder, save_run_tokenizer

                if not (args.resume and run_tokenizer_folder(cfg.run_dir)):
                    save_run_tokenizer(tokenizer, cfg.run_dir)
            print(f"{cfg.name}: {n_params / 1e6:.2f}M parameters on {info.device} ({info.mode} mode"
                  f"{', oneDNN ISA ' + info.onednn_isa if info.onednn_isa else ''}{_kernel_status(info.device)}), "
                  f"{dist.world_size} worker(s)")
            print(f"data: {source.describe() if hasattr(source, 'describe') else source}")
            print(f"run folder: {cfg.run_dir}")
            for note in notes:
                print(note)
        summary = trainer.fit(resume=args.resume)
    except BaseException as err:
        if folder is not None:
            folder.release(restore=start_step is None or trainer.step == start_step)
        if isinstance(err, OSError) and err.strerror and not err.filename:  # e.g. a full disk under a log write
            err.filename = str(cfg.run_dir)                                 # has no file name: say where
        raise
    if folder is not None:
        folder.release()
    return summary


def _run_folder(cfg, args: argparse.Namespace, dist):
    """Rank 0's ``RunFolder``, checked before anything is built (a busy folder or a previous run is refused at
    once, read-only); None on the other ranks, which never write the folder."""
    from ms_diffusion.training.run_folder import RunFolder

    if dist.rank != 0:
        return None
    folder = RunFolder(cfg.run_dir, resume=bool(args.resume), overwrite=args.overwrite)
    folder.check()
    return folder


def _train_autoencoder(cfg, args: argparse.Namespace, info, dist, folder) -> int:
    from ms_diffusion.experiment import build_autoencoder_loss, build_data_source, build_model
    from ms_diffusion.training.autoencoder import AutoencoderTrainer

    autoencoder = build_model(cfg)
    loss = build_autoencoder_loss(cfg)
    source = build_data_source(cfg, autoencoder, shard_id=dist.rank, num_shards=dist.world_size)
    n_params = sum(int(p.size) for p in autoencoder.trainable_params() + loss.discriminator.trainable_params())
    trainer = AutoencoderTrainer(autoencoder, loss, source, cfg.train, cfg.run_dir, meta={"config": cfg.to_dict()},
                                 seed=cfg.seed, rank=dist.rank, world_size=dist.world_size,
                                 grad_reducer=dist.grad_reducer)
    summary = _fit_in_run_folder(trainer, cfg, args, folder, n_params=n_params, source=source, info=info, dist=dist)
    if dist.rank == 0:
        print(f"done: step {summary['step']}, reconstruction L1 {summary['rec_loss']:.4f}, "
              f"{summary['img_per_s']:.1f} img/s, peak RSS {peak_rss_gb():.1f} GB; reconstructions in "
              f"{cfg.run_dir / 'reconstructions'}, checkpoints in {cfg.run_dir / 'checkpoints'}")
    return 0


def _measure_latent_scale(cfg, diffusion, source) -> float:
    """scale_by_std: set the latent diffusion's scale_factor from the first batch of the unsharded data
    (the same on every rank; ``source`` when it is unsharded); a resumed run then replaces it with the
    checkpoint's value."""
    import numpy as np
    from mindspore import Tensor

    from ms_diffusion.experiment import build_data_source

    if source.num_shards != 1:
        source = build_data_source(cfg, diffusion)
    images, _ = next(iter(source.epoch(0, cfg.train.batch_size)))
    noise = np.random.default_rng([cfg.seed, 2]).standard_normal(diffusion.latent_shape(images.shape[0]))
    return diffusion.measure_scale_factor(images, Tensor(noise.astype(np.float32)))


def _resumed_meta(run_dir, resume) -> Optional[dict]:
    """The metadata of the checkpoint ``--resume`` continues from (``"auto"``: the newest whose metadata reads);
    None when there is none, or it does not read (the trainer says why when it loads it)."""
    from pathlib import Path

    from ms_diffusion.io.checkpoint import CheckpointError, newest_readable_meta, read_checkpoint_meta

    if resume == "auto":
        return newest_readable_meta(Path(run_dir) / "checkpoints")
    try:
        return read_checkpoint_meta(resume)
    except CheckpointError:
        return None


def _run(args: argparse.Namespace) -> int:
    from ms_diffusion import runtime
    from ms_diffusion.config import load_config
    from ms_diffusion.experiment import (build_data_source, build_diffusion, build_ema_copy,
                                        build_recorded_diffusion, run_prompts, use_run_tokenizer)
    from ms_diffusion.training.distributed import init_data_parallel

    if args.overwrite and args.resume:
        raise UsageError("--overwrite starts a new run in place of the previous one; it cannot be combined with "
                         "--resume")
    cfg = load_config(args.config, _overrides(args))
    info = runtime.setup(cfg.device, cfg.mode, cfg.seed)
    dist = init_data_parallel()
    folder = _run_folder(cfg, args, dist)
    if cfg.is_autoencoder:
        return _train_autoencoder(cfg, args, info, dist, folder)
    resumed = None
    if args.resume:
        use_run_tokenizer(cfg, cfg.run_dir)   # a text run goes on with the tokenizer it was trained with
        resumed = _resumed_meta(cfg.run_dir, args.resume)
    # a resumed run's pretrained parts (first stage, text encoder) come from its checkpoint, not their files
    diffusion = build_recorded_diffusion(cfg, resumed) if resumed else build_diffusion(cfg)
    ema_diffusion = build_ema_copy(cfg, diffusion)
    source = build_data_source(cfg, diffusion, shard_id=dist.rank, num_shards=dist.world_size)
    out_dir = cfg.run_dir
    meta = {"config": cfg.to_dict()}
    if getattr(diffusion, "first_stage_info", None):   # latent diffusion: what rebuilds its first stage
        meta["first_stage"] = diffusion.first_stage_info
    if getattr(diffusion, "text_encoder_info", None):  # pretrained text encoder: what rebuilds it
        meta["text_encoder"] = diffusion.text_encoder_info
    tokenizer = getattr(diffusion, "tokenizer", None)
    if tokenizer is not None:                          # text: what the prompts' ids depend on
        meta["tokenizer_sha256"] = tokenizer.fingerprint()
    notes = []
    if getattr(diffusion, "scale_by_std", False) and not resumed:   # else the checkpoint holds the scale
        scale = _measure_latent_scale(cfg, diffusion, source)
        notes.append(f"scale_by_std: scale_factor = {scale:.4f} (1 / std of the first batch's latents)")

    from ms_diffusion.evaluation import build_evaluator
    from ms_diffusion.pipeline import cycled_classes, cycled_prompts, generate
    from ms_diffusion.training import Trainer

    num_classes = getattr(diffusion, "num_classes", None)
    prompts = None
    if getattr(diffusion, "text_conditional", False):
        prompts = run_prompts(cfg, source)
    if prompts:
        notes.append(f"text-conditional: grids and evaluations cycle {len(prompts)} prompt(s), e.g. {prompts[0]!r}")

    def sample_fn(ema, n):
        """Training-time grid: classes (or prompts) in turn, guided by sample.guidance_scale, for conditional
        models."""
        extra = {"prompts": cycled_prompts(n, prompts)} if prompts else {"classes": cycled_classes(n, num_classes)}
        return generate(ema, n, batch_size=n, seed=cfg.sample.seed, **extra,
                        **cfg.sample.generate_options(bool(num_classes), text=bool(prompts))).images

    evaluator = build_evaluator(cfg, diffusion, log=print, prompts=prompts) if dist.rank == 0 else None
    trainer = Trainer(diffusion, ema_diffusion, source, cfg.train, out_dir, meta=meta,
                      seed=cfg.seed, rank=dist.rank, world_size=dist.world_size, grad_reducer=dist.grad_reducer(
                          diffusion.trainable_params()), sample_fn=sample_fn, evaluate_fn=evaluator)
    n_params = sum(int(p.size) for p in diffusion.trainable_params())
    summary = _fit_in_run_folder(trainer, cfg, args, folder, n_params=n_params, source=source, info=info, dist=dist,
                                 notes=notes, tokenizer=tokenizer)
    if dist.rank == 0:
        print(f"done: step {summary['step']}, loss {summary['loss']:.4f}, {summary['img_per_s']:.1f} img/s, "
              f"{summary['overflows']} skipped overflow step(s), peak RSS {peak_rss_gb():.1f} GB; "
              f"checkpoints in {out_dir / 'checkpoints'}")
        best = summary.get("best_eval")
        if best:
            print(f"best: FD {best['fd']:.3f} at step {best['step']} ({best['num']} samples, {best['features']}) "
                  f"-> {out_dir / 'best.safetensors'}")
    return 0


def _resume_command(argv: Sequence[str], run_dir) -> str:
    """The command that continues this run: the same arguments, ``--out-dir`` made explicit, ``--resume``."""
    import shlex
    from pathlib import Path

    kept, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--resume":   # its optional CKPT goes too: the resumed run takes the newest checkpoint
            i += 2 if i + 1 < len(argv) and not argv[i + 1].startswith("-") else 1
            continue
        if not (arg.startswith("--resume=") or arg == "--overwrite"):
            kept.append(arg)
        i += 1
    if not any(a == "--out-dir" or a.startswith("--out-dir=") for a in kept):
        kept += ["--out-dir", str(run_dir)]
    script = sys.argv[0] if Path(sys.argv[0]).name == "train.py" else "train.py"
    return shlex.join(["python", script, *kept, "--resume"])


def _run_until_stopped(args: argparse.Namespace, argv: Sequence[str], watcher) -> int:
    """``_run``, with what a stop signal or a diverged run ends in: a message and exit 130 / 143 / 3."""
    from pathlib import Path

    from ms_diffusion.training.interrupt import Interrupted, TrainingDiverged, TrainingInterrupted

    watcher.resume_hint = lambda folder: _resume_command(argv, folder)   # printed by an abort (second Ctrl-C)
    try:
        return _run(args)
    except TrainingInterrupted as stop:
        if stop.checkpoint is None:
            print(f"train.py: stopped by {stop.signal_name} before the first update; nothing to save",
                  file=sys.stderr)
        else:
            ckpt = Path(stop.checkpoint)
            print(f"train.py: stopped by {stop.signal_name} at step {stop.step}; checkpoint {ckpt}\n"
                  f"train.py: resume with: {_resume_command(argv, ckpt.parent.parent)}", file=sys.stderr)
        return stop.exit_code
    except Interrupted as stop:   # before training began, or a data-parallel rank
        print(f"train.py: interrupted by {stop.signal_name}", file=sys.stderr)
        return stop.exit_code
    except TrainingDiverged as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 3


def main(argv: Optional[List[str]] = None) -> int:
    """Run train.py; SIGINT / SIGTERM stop it after the current step with a checkpoint (exit 130 / 143), a
    diverged run stops with exit 3 (``ms_diffusion.training.interrupt``)."""
    from ms_diffusion.training.interrupt import watch_signals

    raw = list(sys.argv[1:] if argv is None else argv)
    with watch_signals("train.py") as watcher:
        try:
            return run_command(lambda args: _run_until_stopped(args, raw, watcher), build_parser(), argv)
        except KeyboardInterrupt as stop:   # while the arguments were parsed
            print("train.py: interrupted", file=sys.stderr)
            return int(getattr(stop, "exit_code", 130))
        finally:
            watcher.resume_hint = None


if __name__ == "__main__":
    sys.exit(main())
