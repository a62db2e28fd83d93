"""The diffusion trainer: data -> host-drawn noise -> compiled step -> EMA -> logs, samples, checkpoints.

The loop itself is ``TrainerBase.fit``; ``Trainer`` supplies its steps as hooks (one micro-batch, the
EMA update, the log line, evaluation before a save, the sample grid after it, the EMA export).

Everything random is drawn on the host from one numpy Generator (timesteps, noise, offset noise,
self-conditioning coin, label dropout) and the data order is a pure function of (seed, epoch), so
a run killed at step N/2 and resumed from its checkpoint reaches the same weights as an
uninterrupted run. Dropout inside the network (off by default) uses MindSpore's RNG and is the
one thing a resume does not replay.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn

from ms_diffusion.imageio import save_grid
from ms_diffusion.io.checkpoint import export_safetensors
from ms_diffusion.io.state import named_parameters
from ms_diffusion.training.amp import AMP_DTYPES, AMP_LEVELS, apply_amp
from ms_diffusion.training.base import CHECKPOINT_FORMAT, MicroStep, TrainerBase, optimizer_state
from ms_diffusion.training.ema import EMA, EMA_WARMUPS
from ms_diffusion.training.optim import LR_SCHEDULES, OPTIMIZERS, build_lr_schedule, build_optimizer, current_lr
from ms_diffusion.training.step import TrainStep, make_loss_scaler

__all__ = ["TrainConfig", "Trainer", "CHECKPOINT_FORMAT"]


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
    max_bad_steps: int = 20           # this many skipped (non-finite) updates in a row stop the run; 0: never
    sample_every: int = 1000
    num_samples: int = 16
    export_safetensors: bool = True
    progress: bool = True
    eval_every: int = 0               # 0: off; else FD of EMA samples every N updates, best -> best.safetensors
    eval_num: int = 500               # generated images per evaluation (must exceed the feature dimension)
    eval_features: str = "classifier"  # classifier (Fashion-MNIST, shipped) | inception (FID, needs eval_weights)
    eval_weights: Optional[str] = None  # feature network weights (inception: required; classifier: optional)

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
            (self.max_bad_steps >= 0, "max_bad_steps must be >= 0 (0 never stops a diverging run)"),
            (self.eval_every >= 0, "eval_every must be >= 0 (0 turns periodic evaluation off)"),
            (self.eval_features != "inception" or not self.eval_every or self.eval_weights,
             "eval_features: inception needs train.eval_weights (the converted FID Inception-v3 weights, "
             "docs/evaluation.md); or use eval_features: classifier"),
            (self.lr_schedule != "cosine" or self.warmup_steps < self.num_steps,
             f"warmup_steps ({self.warmup_steps}) must be below num_steps ({self.num_steps}) for the cosine "
             f"schedule; lower train.warmup_steps or raise train.num_steps"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"train: {msg}")
        return self


class Trainer(TrainerBase):
    """Trains ``diffusion`` (a loss Cell with ``training_inputs``) on ``source`` batches.

    ``ema_diffusion`` is a second instance of the same model that holds the EMA weights and is used
    for sample grids and saved for inference. ``meta`` (e.g. the experiment config) goes into every
    checkpoint so inference needs only the checkpoint. Only ``rank == 0`` writes files.

    ``evaluate_fn(ema_diffusion) -> {"fd": float, ...}`` (e.g. ``training.evaluation.SampleEvaluator``)
    runs every ``eval_every`` updates and at the end; the EMA weights with the lowest ``fd`` so far
    go to ``best.safetensors`` (same format as ``model.safetensors``, plus the evaluation), every
    result to ``log.jsonl``. The best result is part of the checkpoint, so a resumed run keeps it.
    """

    def __init__(self, diffusion: nn.Cell, ema_diffusion: nn.Cell, source, config: TrainConfig, out_dir, *,
                 meta: Optional[Dict[str, Any]] = None, seed: int = 0, rank: int = 0, world_size: int = 1,
                 grad_reducer: Optional[nn.Cell] = None, sample_fn: Optional[Callable[[nn.Cell, int], np.ndarray]] = None,
                 evaluate_fn: Optional[Callable[[nn.Cell], Dict[str, Any]]] = None,
                 log: Callable[[str], None] = print):
        super().__init__(source, config.validate(), out_dir, meta=meta, seed=seed, rank=rank, world_size=world_size,
                         log=log)
        self.diffusion, self.ema_diffusion = diffusion, ema_diffusion
        self.sample_fn = sample_fn
        self.evaluate_fn = evaluate_fn
        self.best_eval: Optional[Dict[str, Any]] = None  # {"step", "fd", ...} of best.safetensors
        self.conditional = getattr(diffusion, "num_classes", None) is not None
        self.captions = bool(getattr(diffusion, "text_conditional", False))   # batches carry captions, not labels
        if self.captions:
            source.require_captions()

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
            # every input is host-drawn (a latent diffusion's posterior sample too): exact resume
            return diffusion.training_loss(images, times=times, noise=noise, classes=classes, self_cond=self_cond,
                                           posterior_noise=posterior_noise)

        self.step_fn = TrainStep(loss_fn, self.optimizer, grad_accum=self.cfg.grad_accum,
                                 clip_grad_norm=self.cfg.clip_grad_norm, loss_scaler=scaler, grad_reducer=grad_reducer)
        self.ema = EMA(diffusion, ema_diffusion, decay=self.cfg.ema_decay, warmup=self.cfg.ema_warmup,
                       inv_gamma=self.cfg.ema_inv_gamma, power=self.cfg.ema_power,
                       update_after_step=self.cfg.ema_update_after_step, update_every=self.cfg.ema_update_every)
        self.ema.copy_from_online()

    # ------------------------------------------------------------------ checkpoint state

    def _state_groups(self) -> Dict[str, Dict[str, ms.Parameter]]:
        scaler = {p.name.split(".")[-1]: p for p in self.step_fn.scaler_parameters()}
        return {"online": named_parameters(self.diffusion), "ema": named_parameters(self.ema_diffusion),
                "optimizer": optimizer_state(self.optimizer), "loss_scaler": scaler}

    def _extra_state(self) -> Dict[str, Any]:
        return {"ema": self.ema.state(), "best_eval": self.best_eval}

    def _load_extra_state(self, meta: Dict[str, Any]) -> None:
        self.ema.load_state(meta["ema"])
        self.best_eval = meta.get("best_eval")

    def _export(self, path: Path, **extra_meta) -> Path:
        """The EMA weights and the experiment meta as a .safetensors file for inference (sample.py)."""
        weights = {name: p.asnumpy() for name, p in named_parameters(self.ema_diffusion).items()}
        meta = dict(self.meta)
        meta.update({"step": self.step, "weights": "ema", **extra_meta})
        return export_safetensors(path, weights, meta)

    def _evaluate(self) -> Dict[str, Any]:
        """Evaluate the EMA weights; keep them as best.safetensors when they beat the best so far."""
        result = dict(self.evaluate_fn(self.ema_diffusion))
        result["step"] = self.step
        improved = self.best_eval is None or result["fd"] < self.best_eval["fd"]
        if improved:
            self._export(self.out_dir / "best.safetensors", eval=result)
            self.best_eval = result
        self._log_line({"step": self.step, "eval": result, "best_step": self.best_eval["step"], "time": time.time()})
        best = self.best_eval
        self.log(f"step {self.step}: FD {result['fd']:.3f} ({result['num']} samples, {result['features']}, "
                 f"{result['seconds']:.0f} s)" + (" -> best.safetensors" if improved else
                                                   f"; best {best['fd']:.3f} at step {best['step']}"))
        return result

    # ------------------------------------------------------------------ hooks of the loop (TrainerBase.fit)

    def _train_micro_batch(self, images: np.ndarray, labels: np.ndarray) -> MicroStep:
        inputs = self.diffusion.training_inputs(images, self.rng,
                                                labels if self.conditional or self.captions else None)
        classes = Tensor(inputs["classes"]) if inputs["classes"] is not None else None
        posterior = inputs.get("posterior_noise")
        loss, norm, finite = self.step_fn(Tensor(images), Tensor(inputs["times"]), Tensor(inputs["noise"]), classes,
                                          inputs["self_cond"], None if posterior is None else Tensor(posterior))
        if norm is None:
            return MicroStep(False, logs=loss)
        return MicroStep(True, skipped=0 if bool(finite.asnumpy()) else 1, logs=loss, norms=(norm,))

    def _after_update(self) -> None:
        self.ema.update()

    def _log_record(self, window: List[MicroStep], img_per_s: float) -> Dict[str, Any]:
        loss = float(np.mean([float(m.logs.asnumpy()) for m in window]))
        return {"step": self.step, "epoch": self.epoch, "loss": loss,
                "lr": current_lr(self.optimizer), "grad_norm": float(window[-1].norms[0].asnumpy()),
                "loss_scale": self.step_fn.loss_scale, "overflows": self.overflows, "img_per_s": img_per_s,
                "time": time.time()}

    def _progress_postfix(self, record: Dict[str, Any]) -> Dict[str, str]:
        return {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}", "img_s": f"{record['img_per_s']:.1f}"}

    def _periodic_evaluation(self) -> None:
        if self.evaluate_fn is not None and self.is_main and self._due(self.cfg.eval_every):
            self._evaluate()

    def _periodic_outputs(self) -> None:
        if self._due(self.cfg.sample_every):
            self._sample_grid()

    def _sample_grid(self) -> Optional[Path]:
        if not self.is_main or self.cfg.num_samples <= 0:
            return None
        if self.sample_fn is not None:
            images = self.sample_fn(self.ema_diffusion, self.cfg.num_samples)
        else:
            images = self.ema_diffusion.sample(batch_size=self.cfg.num_samples, seed=self.seed).asnumpy()
        return save_grid(images, self.out_dir / "samples" / f"step_{self.step:08d}.png",
                         scale=max(1, 64 // max(images.shape[-1], 1)))

    def _summary(self, record: Dict[str, Any]) -> Dict[str, Any]:
        summary = super()._summary(record)
        if self.best_eval is not None:
            summary["best_eval"] = self.best_eval
        return summary

    def _export_weights(self) -> Path:
        return self._export(self.out_dir / "model.safetensors")
