"""Two-optimizer training of the KL autoencoder (ldm ``AutoencoderKL`` + ``LPIPSWithDiscriminator``), compiled.

One optimizer update (``grad_accum`` micro-batches, each):

1. generator step: ``GeneratorLoss(images, step, posterior_noise, with_gan, gan)`` differentiated
   with respect to the autoencoder (and ``logvar`` with ``learn_logvar``), then its Adam update;
   ``with_gan = step >= disc_start`` is a compile-time constant, so steps before ``disc_start`` do
   not run the discriminator at all; from then on ``gan`` (g_loss, its gradient at the decoder
   output, the adaptive weight) comes from ``GeneratorLoss.gan_terms`` compiled as a graph of its
   own (one extra autoencoder forward), since a differentiated graph containing gradients does
   not compile in reasonable time;
2. discriminator step, only once ``step >= disc_start``: ``DiscriminatorLoss(images,
   reconstructions, step)`` on the generator step's (detached) reconstructions, then the
   discriminator's own Adam update.

Both steps go through ``TrainStep`` (clipping, accumulation, data-parallel gradient averaging).
The posterior noise is drawn on the host from the trainer's RNG and the data order is a function of
(seed, epoch), so a resumed run reaches the same weights as an uninterrupted one. Checkpoint groups:
``online`` (the autoencoder), ``loss`` (``logvar`` and the discriminator with its BatchNorm
statistics; the frozen LPIPS network comes from its own file and is not saved), ``optimizer`` and
``disc_optimizer`` (Adam moments and step counts), ``loss_scaler``. The run folder gets
``log.jsonl`` (generator and discriminator logs), ``loss.png``, ``reconstructions/step_N.png``
(rows of inputs above rows of their reconstructions) and, at the end, ``model.safetensors`` with
the autoencoder's weights and config: what a ``latent`` diffusion config names as ``first_stage``.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from ms_diffusion.imageio import save_grid
from ms_diffusion.io.checkpoint import export_safetensors
from ms_diffusion.io.state import named_parameters
from ms_diffusion.losses.autoencoder import (DISCRIMINATOR_LOG_KEYS, GENERATOR_LOG_KEYS, DiscriminatorLoss,
                                             GeneratorLoss, LPIPSWithDiscriminator)
from ms_diffusion.models.autoencoder import AutoencoderKL
from ms_diffusion.models.distributions import split_moments
from ms_diffusion.runtime import maybe_jit
from ms_diffusion.training.base import MicroStep, TrainerBase, optimizer_state
from ms_diffusion.training.optim import build_lr_schedule, build_optimizer, current_lr
from ms_diffusion.training.step import TrainStep
from ms_diffusion.training.trainer import TrainConfig

__all__ = ["AutoencoderTrainer", "reconstruction_grid"]

GradReducerFactory = Callable[[Sequence[Parameter]], Optional[nn.Cell]]


def reconstruction_grid(inputs: np.ndarray, reconstructions: np.ndarray, path, nrow: int = 8) -> Path:
    """PNG of (N, C, H, W) images in [0, 1]: each row of ``nrow`` inputs above the row of their reconstructions."""
    if inputs.shape != reconstructions.shape:
        raise ValueError(f"inputs {inputs.shape} and reconstructions {reconstructions.shape} differ in shape")
    nrow = max(1, min(int(nrow), inputs.shape[0]))
    rows = []
    for start in range(0, inputs.shape[0], nrow):
        chunk_in, chunk_rec = inputs[start:start + nrow], reconstructions[start:start + nrow]
        if chunk_in.shape[0] < nrow:   # keep the pairs aligned: pad the last row with white
            pad = np.ones((nrow - chunk_in.shape[0],) + chunk_in.shape[1:], chunk_in.dtype)
            chunk_in, chunk_rec = np.concatenate([chunk_in, pad]), np.concatenate([chunk_rec, pad])
        rows += [chunk_in, chunk_rec]
    images = np.concatenate(rows)
    return save_grid(images, path, nrow=nrow, scale=max(1, 64 // max(images.shape[-1], 1)))


class AutoencoderTrainer(TrainerBase):
    """Trains ``autoencoder`` with ``loss`` (its PatchGAN, logvar and LPIPS) on ``source`` batches (``fit``: the
    ``TrainerBase`` loop).

    ``config`` is the ``train:`` section: ``lr``, ``adam_betas`` (ldm: (0.5, 0.9)), ``optimizer``,
    ``lr_schedule`` and ``clip_grad_norm`` apply to both optimizers; ``sample_every`` /
    ``num_samples`` set how often and how many reconstructions are drawn; the EMA options do not
    apply (ldm's autoencoder has no EMA). Training runs in float32 (``amp`` must be O0).
    ``grad_reducer`` (e.g. ``DataParallel.grad_reducer``) builds a gradient all-reduce for a
    parameter list, or returns None for a single process.
    """

    progress_desc = "train autoencoder"

    def __init__(self, autoencoder: AutoencoderKL, loss: LPIPSWithDiscriminator, source, config: TrainConfig,
                 out_dir, *, meta: Optional[Dict[str, Any]] = None, seed: int = 0, rank: int = 0,
                 world_size: int = 1, grad_reducer: Optional[GradReducerFactory] = None,
                 log: Callable[[str], None] = print):
        config = config.validate()
        if config.amp != "O0":
            raise ValueError(f"train.amp={config.amp!r}: autoencoder training runs in float32; set train.amp to O0")
        if config.loss_scale not in ("auto", "none"):
            raise ValueError(f"train.loss_scale={config.loss_scale!r}: autoencoder training runs in float32 without "
                             f"loss scaling; set train.loss_scale to auto or none")
        super().__init__(source, config, out_dir, meta=meta, seed=seed, rank=rank, world_size=world_size, log=log)
        self.autoencoder, self.loss = autoencoder, loss
        self.generator_loss = GeneratorLoss(autoencoder, loss)
        self.discriminator_loss = DiscriminatorLoss(loss)
        self.generator_loss.set_train(True)
        self.discriminator_loss.set_train(True)
        cfg = self.cfg
        reducer = grad_reducer or (lambda params: None)

        def optimizer(params):
            schedule = build_lr_schedule(cfg.lr_schedule, cfg.lr, warmup_steps=cfg.warmup_steps,
                                         total_steps=cfg.num_steps, min_lr=cfg.min_lr)
            return build_optimizer(params, cfg.optimizer, schedule, betas=cfg.adam_betas,
                                   weight_decay=cfg.weight_decay)

        g_params = self.generator_loss.generator_parameters()
        d_params = self.discriminator_loss.discriminator_parameters()
        self.optimizer = optimizer(g_params)
        self.disc_optimizer = optimizer(d_params)
        self.g_step = TrainStep(self.generator_loss, self.optimizer, grad_accum=cfg.grad_accum,
                                clip_grad_norm=cfg.clip_grad_norm, grad_reducer=reducer(g_params), has_aux=True)
        self.d_step = TrainStep(self.discriminator_loss, self.disc_optimizer, grad_accum=cfg.grad_accum,
                                clip_grad_norm=cfg.clip_grad_norm, grad_reducer=reducer(d_params), has_aux=True)
        self._reconstruct = maybe_jit(self._reconstruct_impl)
        self._gan_terms = maybe_jit(self._gan_terms_impl)
        self._grid_inputs: Optional[np.ndarray] = None

    @property
    def disc_start(self) -> int:
        return self.loss.disc_start

    # ------------------------------------------------------------------ checkpoint state

    def _state_groups(self) -> Dict[str, Dict[str, ms.Parameter]]:
        loss_state = {name: p for name, p in named_parameters(self.loss).items()
                      if not name.startswith("perceptual_loss.")}
        scalers = {}
        for prefix, step in (("", self.g_step), ("disc_", self.d_step)):
            scalers.update({prefix + p.name.split(".")[-1]: p for p in step.scaler_parameters()})
        return {"online": named_parameters(self.autoencoder), "loss": loss_state,
                "optimizer": optimizer_state(self.optimizer), "disc_optimizer": optimizer_state(self.disc_optimizer),
                "loss_scaler": scalers}

    # ------------------------------------------------------------------ reconstructions

    def _gan_terms_impl(self, x, global_step, noise):
        return self.generator_loss.gan_terms(x, global_step, noise)

    def _reconstruct_impl(self, x):
        mean, _ = split_moments(self.autoencoder.encode_moments(x))
        return ops.clamp(self.autoencoder.decode(mean), -1.0, 1.0)

    def reconstruct(self, images: np.ndarray) -> np.ndarray:
        """Images (B, C, H, W) in [0, 1] -> their reconstructions from the posterior mean, in [0, 1]."""
        out = self._reconstruct(Tensor(np.asarray(images, np.float32) * 2.0 - 1.0))
        return (out.asnumpy() + 1.0) * 0.5

    def _reconstruction_grid(self) -> Optional[Path]:
        n = self.cfg.num_samples
        if not self.is_main or n <= 0:
            return None
        if self._grid_inputs is None:   # the same images every time: the first ones of epoch 0
            n = min(n, self.source.num_samples)
            self._grid_inputs, _ = next(iter(self.source.epoch(0, n)))
        return reconstruction_grid(self._grid_inputs, self.reconstruct(self._grid_inputs),
                                   self.out_dir / "reconstructions" / f"step_{self.step:08d}.png")

    # ------------------------------------------------------------------ hooks of the loop (TrainerBase.fit)

    def _train_micro_batch(self, images: np.ndarray, labels: np.ndarray) -> MicroStep:
        x = Tensor(images * np.float32(2.0) - np.float32(1.0))
        noise = Tensor(self.rng.standard_normal(self.autoencoder.latent_shape(images.shape)).astype(np.float32))
        global_step = Tensor(self.step, ms.int32)
        with_gan = self.step >= self.disc_start
        # the GAN terms (adaptive weight, discriminator gradient) in their own graph: nested
        # gradients inside the differentiated step take MindSpore's compiler far too long
        gan = ms.mutable(self._gan_terms(x, global_step, noise)) if with_gan else None  # not constants
        _, g_norm, g_finite, (g_logs, reconstructions) = self.g_step(x, global_step, noise, with_gan, gan)
        d_logs, d_norm, finite = None, None, [g_finite]
        if with_gan:
            _, d_norm, d_finite, (d_logs,) = self.d_step(x, reconstructions, global_step)
            finite.append(d_finite)
        if g_norm is None:
            return MicroStep(False, logs=(g_logs, d_logs))
        return MicroStep(True, skipped=sum(not bool(f.asnumpy()) for f in finite), logs=(g_logs, d_logs),
                         norms=(g_norm, d_norm))

    def _log_record(self, window: List[MicroStep], img_per_s: float) -> Dict[str, Any]:
        record: Dict[str, Any] = {"step": self.step, "epoch": self.epoch}
        g_logs = np.mean([[float(v.asnumpy()) for v in m.logs[0]] for m in window], axis=0)
        record["loss"] = float(g_logs[0])
        record.update({key: float(v) for key, v in zip(GENERATOR_LOG_KEYS, g_logs)})
        d_window = [m.logs[1] for m in window if m.logs[1] is not None]
        if d_window:
            d_logs = np.mean([[float(v.asnumpy()) for v in logs] for logs in d_window], axis=0)
            record.update({key: float(v) for key, v in zip(DISCRIMINATOR_LOG_KEYS, d_logs)})
        g_norm, d_norm = window[-1].norms
        record.update({"lr": current_lr(self.optimizer), "grad_norm": float(g_norm.asnumpy()),
                       "disc_grad_norm": None if d_norm is None else float(d_norm.asnumpy()),
                       "overflows": self.overflows, "img_per_s": img_per_s, "time": time.time()})
        return record

    def _progress_postfix(self, record: Dict[str, Any]) -> Dict[str, str]:
        return {"rec": f"{record['rec_loss']:.4f}", "kl": f"{record['kl_loss']:.1f}",
                "img_s": f"{record['img_per_s']:.1f}"}

    def _periodic_outputs(self) -> None:
        if self._due(self.cfg.sample_every):
            self._reconstruction_grid()

    def _summary(self, record: Dict[str, Any]) -> Dict[str, Any]:
        return {"step": self.step, "loss": record.get("loss", float("nan")),
                "rec_loss": record.get("rec_loss", float("nan")), "img_per_s": record.get("img_per_s", 0.0),
                "overflows": self.overflows, "out_dir": str(self.out_dir)}

    def _export_weights(self) -> Path:
        weights = {name: p.asnumpy() for name, p in named_parameters(self.autoencoder).items()}
        meta = dict(self.meta)
        meta.update({"step": self.step, "weights": "online"})
        return export_safetensors(self.out_dir / "model.safetensors", weights, meta)
