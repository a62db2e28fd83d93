"""The training loop: data -> host-drawn noise -> compiled step -> EMA -> logs, samples, checkpoints.

Everything random is drawn on the host from one numpy Generator (timesteps, noise, offset noise,
self-conditioning coin, label dropout) and the data order is a pure function of (seed, epoch), so
a run killed at step N/2 and resumed from its checkpoint reaches the same weights as an
uninterrupted run. Dropout inside the network (off by default) uses MindSpore's RNG and is the
one thing a resume does not replay.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn
from tqdm.auto import tqdm

from ms_diffusion.imageio import plot_losses, save_grid
from ms_diffusion.interop.state import named_parameters
from ms_diffusion.training.amp import AMP_DTYPES, AMP_LEVELS, apply_amp
from ms_diffusion.training.checkpoint import (CheckpointError, checkpoint_path, export_safetensors, latest_checkpoint,
                                              load_checkpoint, prune_checkpoints, save_checkpoint)
from ms_diffusion.training.ema import EMA, EMA_WARMUPS
from ms_diffusion.training.optim import LR_SCHEDULES, OPTIMIZERS, build_lr_schedule, build_optimizer, current_lr
from ms_diffusion.training.step import TrainStep, make_loss_scaler

__all__ = ["TrainConfig", "Trainer", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = 1


@dataclass
class TrainConfig:
    """Optimisation, EMA, logging and checkpointing options (the ``train:`` section of a config)."""

    num_steps: int = 10000            # optimizer updates
    batch_size: int = 16              # per device and micro-batch
    grad_accum: int = 1
    lr: float = 1e-4
    lr_schedule: str = "constant"     # constant | cosine
    warmup_steps: int = 0
    min_lr: float = 0.0
    optimizer: str = "adam"           # adam | adamw
    adam_betas: Tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    clip_grad_norm: Optional[float] = 1.0
    amp: str = "O0"                   # O0 (fp32) | O1 | O2 | O3
    amp_dtype: str = "float16"        # float16 | bfloat16
    loss_scale: str = "auto"          # auto (dynamic with amp, none in fp32) | dynamic | static | none
    loss_scale_init: float = 65536.0
    loss_scale_factor: float = 2.0
    loss_scale_window: int = 1000
    ema_decay: float = 0.995
    ema_warmup: str = "inv_gamma"     # inv_gamma (lucidrains) | ldm | none
    ema_update_every: int = 10
    ema_update_after_step: int = 100
    ema_inv_gamma: float = 1.0
    ema_power: float = 0.6666666666666666
    log_every: int = 10
    save_every: int = 1000
    keep_last: int = 3
    sample_every: int = 1000
    num_samples: int = 16
    export_safetensors: bool = True
    progress: bool = True

    def validate(self) -> "TrainConfig":
        checks = [
            (self.num_steps >= 1, "num_steps must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.grad_accum >= 1, "grad_accum must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {LR_SCHEDULES}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}"),
            (self.amp in AMP_LEVELS, f"amp must be one of {AMP_LEVELS}"),
            (self.amp_dtype in AMP_DTYPES, f"amp_dtype must be one of {sorted(AMP_DTYPES)}"),
            (self.loss_scale in ("auto", "dynamic", "static", "none"), "loss_scale must be auto, dynamic, static or none"),
            (self.ema_warmup in EMA_WARMUPS, f"ema_warmup must be one of {EMA_WARMUPS}"),
            (0.0 <= self.ema_decay < 1.0, "ema_decay must lie in [0, 1)"),
            (self.save_every >= 1 and self.log_every >= 1, "save_every and log_every must be >= 1"),
            (self.lr_schedule != "cosine" or self.warmup_steps < self.num_steps,
             f"warmup_steps ({self.warmup_steps}) must be below num_steps ({self.num_steps}) for the cosine "
             f"schedule; lower train.warmup_steps or raise train.num_steps"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"train: {msg}")
        return self


class Trainer:
    """Trains ``diffusion`` (a loss Cell with ``training_inputs``) on ``source`` batches.

    ``ema_diffusion`` is a second instance of the same model that holds the EMA weights and is used
    for sample grids and saved for inference. ``meta`` (e.g. the experiment config) goes into every
    checkpoint so inference needs only the checkpoint. Only ``rank == 0`` writes files.
    """

    def __init__(self, diffusion: nn.Cell, ema_diffusion: nn.Cell, source, config: TrainConfig, out_dir, *,
                 meta: Optional[Dict[str, Any]] = None, seed: int = 0, rank: int = 0, world_size: int = 1,
                 grad_reducer: Optional[nn.Cell] = None, sample_fn: Optional[Callable[[nn.Cell, int], np.ndarray]] = None,
                 log: Callable[[str], None] = print):
        self.cfg = config.validate()
        self.diffusion, self.ema_diffusion, self.source = diffusion, ema_diffusion, source
        self.out_dir = Path(out_dir)
        self.meta = dict(meta or {})
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.is_main = self.rank == 0
        self.log = log if self.is_main else (lambda *_: None)
        self.sample_fn = sample_fn
        self.conditional = getattr(diffusion, "num_classes", None) is not None

        apply_amp(diffusion.model, self.cfg.amp, self.cfg.amp_dtype)
        diffusion.set_train(True)
        ema_diffusion.set_train(False)
        params = diffusion.trainable_params()
        if not params:
            raise ValueError("the model has no trainable parameters")
        schedule = build_lr_schedule(self.cfg.lr_schedule, self.cfg.lr, warmup_steps=self.cfg.warmup_steps,
                                     total_steps=self.cfg.num_steps, min_lr=self.cfg.min_lr)
        self.optimizer = build_optimizer(params, self.cfg.optimizer, schedule, betas=self.cfg.adam_betas,
                                         weight_decay=self.cfg.weight_decay)
        scale_kind = self.cfg.loss_scale if self.cfg.loss_scale != "auto" else ("none" if self.cfg.amp == "O0"
                                                                                 else "dynamic")
        scaler = make_loss_scaler(scale_kind, self.cfg.loss_scale_init, self.cfg.loss_scale_factor,
                                  self.cfg.loss_scale_window)

        def loss_fn(images, times, noise, classes, self_cond, posterior_noise):
            if posterior_noise is None:
                return diffusion(images, classes, times, noise, self_cond, 0.0)
            # latent diffusion: the first stage's posterior sample is host-drawn too (exact resume)
            return diffusion(images, classes, times, noise, self_cond, 0.0, "mean", posterior_noise)

        self.step_fn = TrainStep(loss_fn, self.optimizer, grad_accum=self.cfg.grad_accum,
                                 clip_grad_norm=self.cfg.clip_grad_norm, loss_scaler=scaler, grad_reducer=grad_reducer)
        self.ema = EMA(diffusion, ema_diffusion, decay=self.cfg.ema_decay, warmup=self.cfg.ema_warmup,
                       inv_gamma=self.cfg.ema_inv_gamma, power=self.cfg.ema_power,
                       update_after_step=self.cfg.ema_update_after_step, update_every=self.cfg.ema_update_every)
        self.ema.copy_from_online()

        self.rng = np.random.default_rng([self.seed, 1, self.rank])
        self.step = 0            # optimizer updates done
        self.epoch = 0
        self.batch_in_epoch = 0  # micro-batches of this epoch consumed
        self.overflows = 0
        self._history: List[Tuple[int, float]] = []

    # ------------------------------------------------------------------ checkpoint state

    def _optimizer_state(self) -> Dict[str, ms.Parameter]:
        own = {id(p) for p in self.optimizer.parameters}
        return {name: p for name, p in self.optimizer.parameters_and_names() if id(p) not in own}

    def _state_groups(self) -> Dict[str, Dict[str, ms.Parameter]]:
        scaler = {p.name.split(".")[-1]: p for p in self.step_fn.scaler_parameters()}
        return {"online": named_parameters(self.diffusion), "ema": named_parameters(self.ema_diffusion),
                "optimizer": self._optimizer_state(), "loss_scaler": scaler}

    def state_meta(self) -> Dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, "step": self.step, "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch, "overflows": self.overflows, "ema": self.ema.state(),
                "rng": self.rng.bit_generator.state, "seed": self.seed, "world_size": self.world_size,
                **self.meta}

    def save(self) -> Optional[Path]:
        if not self.is_main:
            return None
        tensors = {f"{group}.{name}": p for group, params in self._state_groups().items()
                   for name, p in params.items()}
        path = save_checkpoint(checkpoint_path(self.out_dir / "checkpoints", self.step), tensors, self.state_meta())
        prune_checkpoints(self.out_dir / "checkpoints", self.cfg.keep_last)
        return path

    def load(self, path) -> None:
        arrays, meta = load_checkpoint(path)
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path}: checkpoint format {meta.get('format')} is not supported (expected "
                                  f"{CHECKPOINT_FORMAT})")
        problems = []
        for group, params in self._state_groups().items():
            for name, p in params.items():
                key = f"{group}.{name}"
                if key not in arrays:
                    problems.append(f"missing {key}")
                elif tuple(arrays[key].shape) != tuple(p.shape):
                    problems.append(f"{key} has shape {tuple(arrays[key].shape)}, model expects {tuple(p.shape)}")
        if problems:
            shown = "; ".join(problems[:5]) + (f"; … ({len(problems)} problems)" if len(problems) > 5 else "")
            raise CheckpointError(f"checkpoint {path} does not match this model/config: {shown}")
        for group, params in self._state_groups().items():
            for name, p in params.items():
                p.set_data(Tensor(arrays[f"{group}.{name}"].astype(ms.dtype_to_nptype(p.dtype))))
        self.step, self.epoch = int(meta["step"]), int(meta["epoch"])
        self.batch_in_epoch, self.overflows = int(meta["batch_in_epoch"]), int(meta.get("overflows", 0))
        self.ema.load_state(meta["ema"])
        if int(meta.get("world_size", 1)) == self.world_size and int(meta.get("seed", self.seed)) == self.seed:
            self.rng.bit_generator.state = meta["rng"]

    def resume(self, resume) -> Optional[Path]:
        """``resume`` is a checkpoint path, ``"auto"`` (latest in out_dir, if any) or None."""
        if not resume:
            return None
        path = latest_checkpoint(self.out_dir / "checkpoints") if resume == "auto" else Path(resume)
        if path is None:
            self.log(f"no checkpoint in {self.out_dir / 'checkpoints'}; starting from scratch")
            return None
        self.load(path)
        self.log(f"resumed from {path} at step {self.step} (epoch {self.epoch}, batch {self.batch_in_epoch})")
        return path

    # ------------------------------------------------------------------ loop

    def _batches(self) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """Micro-batches from the saved position on, across epochs; advances the position."""
        bs = self.cfg.batch_size
        if self.source.batches_per_epoch(bs) < 1:
            raise ValueError(f"the dataset has {self.source.num_samples} images per device, fewer than one batch "
                             f"of {bs}; lower train.batch_size or add data")
        while True:
            for images, labels in self.source.epoch(self.epoch, bs, start_batch=self.batch_in_epoch):
                self.batch_in_epoch += 1
                yield images, labels
            self.epoch += 1
            self.batch_in_epoch = 0

    def _log_line(self, record: Dict[str, Any]) -> None:
        if not self.is_main:
            return
        with open(self.out_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _write_plots(self) -> None:
        if self.is_main and self._history:
            steps, losses = zip(*self._history)
            plot_losses(steps, losses, self.out_dir / "loss.png")

    def _sample_grid(self) -> Optional[Path]:
        if not self.is_main or self.cfg.num_samples <= 0:
            return None
        if self.sample_fn is not None:
            images = self.sample_fn(self.ema_diffusion, self.cfg.num_samples)
        else:
            images = self.ema_diffusion.sample(batch_size=self.cfg.num_samples, seed=self.seed).asnumpy()
        return save_grid(images, self.out_dir / "samples" / f"step_{self.step:08d}.png",
                         scale=max(1, 64 // max(images.shape[-1], 1)))

    def _load_history(self) -> None:
        log = self.out_dir / "log.jsonl"
        if not log.exists():
            return
        for line in log.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if rec.get("step", 0) <= self.step and "loss" in rec:
                self._history.append((rec["step"], rec["loss"]))

    def fit(self, resume=None) -> Dict[str, Any]:
        """Train until ``num_steps`` updates; returns a summary (final loss, img/s, paths)."""
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.resume(resume)
        self._load_history()
        cfg = self.cfg
        images_per_update = cfg.batch_size * cfg.grad_accum * self.world_size
        bar = tqdm(total=cfg.num_steps, initial=self.step, disable=not (cfg.progress and self.is_main),
                   desc="train", dynamic_ncols=True)
        window: List[ms.Tensor] = []
        t_last, steps_last = time.perf_counter(), self.step
        last_loss, img_per_s = float("nan"), 0.0
        batches = self._batches()
        try:
            while self.step < cfg.num_steps:
                images, labels = next(batches)
                inputs = self.diffusion.training_inputs(images, self.rng, labels if self.conditional else None)
                classes = Tensor(inputs["classes"]) if inputs["classes"] is not None else None
                posterior = inputs.get("posterior_noise")
                loss, norm, finite = self.step_fn(Tensor(images), Tensor(inputs["times"]), Tensor(inputs["noise"]),
                                                  classes, inputs["self_cond"],
                                                  None if posterior is None else Tensor(posterior))
                window.append(loss)
                if norm is None:
                    continue  # accumulating micro-batches
                self.step += 1
                if not bool(finite.asnumpy()):
                    self.overflows += 1
                self.ema.update()
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.num_steps:
                    last_loss = float(np.mean([float(x.asnumpy()) for x in window]))
                    window.clear()
                    now = time.perf_counter()
                    img_per_s = (self.step - steps_last) * images_per_update / max(now - t_last, 1e-9)
                    t_last, steps_last = now, self.step
                    record = {"step": self.step, "epoch": self.epoch, "loss": last_loss,
                              "lr": current_lr(self.optimizer), "grad_norm": float(norm.asnumpy()),
                              "loss_scale": self.step_fn.loss_scale, "overflows": self.overflows,
                              "img_per_s": img_per_s, "time": time.time()}
                    self._history.append((self.step, last_loss))
                    self._log_line(record)
                    bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{record['lr']:.2e}", img_s=f"{img_per_s:.1f}")
                if self.step % cfg.save_every == 0 or self.step == cfg.num_steps:
                    self.save()
                    self._write_plots()
                if cfg.sample_every and (self.step % cfg.sample_every == 0 or self.step == cfg.num_steps):
                    self._sample_grid()
        finally:
            bar.close()
        summary = {"step": self.step, "loss": last_loss, "img_per_s": img_per_s, "overflows": self.overflows,
                   "out_dir": str(self.out_dir)}
        if self.is_main and cfg.export_safetensors:
            weights = {name: p.asnumpy() for name, p in named_parameters(self.ema_diffusion).items()}
            meta = {k: v for k, v in self.meta.items()}
            meta.update({"step": self.step, "weights": "ema"})
            summary["safetensors"] = str(export_safetensors(self.out_dir / "model.safetensors", weights, meta))
        return summary
