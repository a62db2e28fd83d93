"""What every trainer shares: run folder, data position, host RNG, grouped checkpoints, logs.

A trainer subclass owns its networks, optimizers and compiled steps; it declares which
Parameters a checkpoint holds by overriding ``_state_groups`` ({group: {name: Parameter}}, saved
as ``group.name``) and may add JSON state (``_extra_state`` / ``_load_extra_state``). This base
keeps the rest identical for all trainers: the exact data position (epoch, batch in epoch) and the
host RNG state, so a resumed run continues bit for bit; atomic step checkpoints with pruning; the
``log.jsonl`` lines and the loss plot.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn

from ms_diffusion.imageio import plot_losses
from ms_diffusion.training.checkpoint import (CheckpointError, checkpoint_path, latest_checkpoint, load_checkpoint,
                                              prune_checkpoints, save_checkpoint)
from ms_diffusion.training.distributed import check_replicas, gather_rng_states, resume_position, rng_for_resume

__all__ = ["TrainerBase", "optimizer_state", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = 1


def optimizer_state(optimizer: nn.Optimizer) -> Dict[str, ms.Parameter]:
    """The optimizer's own state (moments, step count, ...) by name, without the parameters it updates."""
    own = {id(p) for p in optimizer.parameters}
    return {name: p for name, p in optimizer.parameters_and_names() if id(p) not in own}


class TrainerBase:
    """Shared state and I/O of a trainer over an ``ImageSource``; subclasses implement ``_state_groups`` and ``fit``.

    ``config`` needs ``batch_size``, ``keep_last``; ``meta`` (e.g. the experiment config) goes into
    every checkpoint. Only ``rank == 0`` writes files.
    """

    def __init__(self, source, config, out_dir, *, meta: Optional[Dict[str, Any]] = None, seed: int = 0,
                 rank: int = 0, world_size: int = 1, log: Callable[[str], None] = print):
        self.cfg = config
        self.source = source
        self.out_dir = Path(out_dir)
        self.meta = dict(meta or {})
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.is_main = self.rank == 0
        self.log = log if self.is_main else (lambda *_: None)
        self.rng = np.random.default_rng([self.seed, 1, self.rank])
        self.rng_restored = True  # False after a resume that could not restore this rank's RNG stream
        self.step = 0            # optimizer updates done
        self.epoch = 0
        self.batch_in_epoch = 0  # micro-batches of this epoch consumed
        self.overflows = 0
        self._history: List[Tuple[int, float]] = []

    # ------------------------------------------------------------------ checkpoint state

    def _state_groups(self) -> Dict[str, Dict[str, ms.Parameter]]:
        raise NotImplementedError

    def _extra_state(self) -> Dict[str, Any]:
        """JSON-serialisable state of the subclass saved in the checkpoint metadata."""
        return {}

    def _load_extra_state(self, meta: Dict[str, Any]) -> None:
        """Restore what ``_extra_state`` saved."""

    def state_meta(self) -> Dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, "step": self.step, "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch, "overflows": self.overflows, **self._extra_state(),
                "rng": self.rng.bit_generator.state, "seed": self.seed, "world_size": self.world_size,
                "batch_size": self.cfg.batch_size, **self.meta}

    def save(self) -> Optional[Path]:
        rng_ranks = gather_rng_states(self.rng)  # data parallel: a collective, so every rank takes part
        if not self.is_main:
            return None
        tensors = {f"{group}.{name}": p for group, params in self._state_groups().items()
                   for name, p in params.items()}
        meta = self.state_meta()
        if rng_ranks is not None:
            meta["rng_ranks"] = rng_ranks  # rank r's host RNG, restored by rank r on resume
        path = save_checkpoint(checkpoint_path(self.out_dir / "checkpoints", self.step), tensors, meta)
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
        self.step, self.overflows = int(meta["step"]), int(meta.get("overflows", 0))
        # another worker count or per-device batch: continue after the samples already consumed
        saved_batch = meta.get("batch_size") or meta.get("config", {}).get("train", {}).get("batch_size")
        self.epoch, self.batch_in_epoch = resume_position(
            int(meta["epoch"]), int(meta["batch_in_epoch"]), saved_batch_size=int(saved_batch or self.cfg.batch_size),
            saved_world_size=int(meta.get("world_size", 1)), batch_size=self.cfg.batch_size,
            world_size=self.world_size, batches_per_epoch=self.source.batches_per_epoch(self.cfg.batch_size))
        self._load_extra_state(meta)
        self.rng, self.rng_restored = rng_for_resume(meta, seed=self.seed, rank=self.rank,
                                                     world_size=self.world_size, step=self.step)

    def resume(self, resume) -> Optional[Path]:
        """``resume`` is a checkpoint path, ``"auto"`` (latest in out_dir, if any) or None."""
        path = None
        if resume:
            path = latest_checkpoint(self.out_dir / "checkpoints") if resume == "auto" else Path(resume)
            if path is None:
                self.log(f"no checkpoint in {self.out_dir / 'checkpoints'}; starting from scratch")
        if path is not None:
            self.load(path)
            self.log(f"resumed from {path} at step {self.step} (epoch {self.epoch}, batch {self.batch_in_epoch})")
            if not self.rng_restored:
                self.log(f"the checkpoint's noise/timestep streams were written with another seed or worker count; "
                         f"each rank continues with a fresh stream seeded by (seed, rank, step {self.step})")
        if self.world_size > 1:
            self.check_replicas(f"after resuming from {path}" if path is not None else "at the start of training")
            accum = getattr(self.cfg, "grad_accum", 1)
            self.log(f"data parallel: {self.world_size} workers x batch {self.cfg.batch_size} x {accum} micro-batch(es) "
                     f"= {self.world_size * self.cfg.batch_size * accum} images per update; the learning rate is per "
                     f"update and not scaled with the number of workers (docs/distributed.md); replicas verified "
                     f"identical")
        return path

    def check_replicas(self, when: str) -> None:
        """Data parallel: raise unless every rank holds bit-identical training state (a collective)."""
        arrays = {f"{group}.{name}": p.asnumpy() for group, params in self._state_groups().items()
                  for name, p in params.items()}
        check_replicas(arrays, self.step, self.epoch, self.batch_in_epoch, when)

    # ------------------------------------------------------------------ data and logs

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
