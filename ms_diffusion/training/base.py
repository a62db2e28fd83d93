"""What every trainer shares: the training loop, run folder, data position, host RNG, grouped checkpoints, logs.

``TrainerBase.fit`` is the one loop (resume, progress bar, micro-batches, step counting, log lines,
checkpoints, periodic outputs, stop signals, summary, final export); a trainer fills in what differs
through hooks: ``_train_micro_batch`` (one micro-batch through its compiled step(s), returning a
``MicroStep``), ``_log_record`` / ``_progress_postfix``, ``_after_update``, ``_periodic_evaluation``
(before a save) and ``_periodic_outputs`` (after it), ``_summary`` and ``_export_weights``.

A trainer subclass owns its networks, optimizers and compiled steps; it declares which
Parameters a checkpoint holds by overriding ``_state_groups`` ({group: {name: Parameter}}, saved
as ``group.name``) and may add JSON state (``_extra_state`` / ``_load_extra_state``). This base
keeps the rest identical for all trainers: the exact data position (epoch, batch in epoch) and the
host RNG state, so a resumed run continues bit for bit; atomic step checkpoints with pruning; the
``log.jsonl`` lines and the loss plot; and what stops a loop between two updates: a SIGINT / SIGTERM
(``_stop_signals`` / ``_stop_if_asked``: save this step, raise ``TrainingInterrupted``) and a run of
``max_bad_steps`` skipped updates (``_track_update``: ``TrainingDiverged``, nothing saved). See
docs/recovery.md.
"""
from __future__ import annotations

import json
import os
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn
from tqdm.auto import tqdm

from ms_diffusion.imageio import plot_losses
from ms_diffusion.io.checkpoint import (CheckpointError, checkpoint_path, list_checkpoints, load_checkpoint,
                                              newest_readable_checkpoint, prune_checkpoints, remove_temporaries,
                                              save_checkpoint)
from ms_diffusion.io.state import numpy_dtype
from ms_diffusion.training.distributed import check_replicas, gather_rng_states, resume_position, rng_for_resume
from ms_diffusion.training.interrupt import TrainingDiverged, TrainingInterrupted, graceful_stop, signal_name

__all__ = ["TrainerBase", "MicroStep", "optimizer_state", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = 1


def optimizer_state(optimizer: nn.Optimizer) -> Dict[str, ms.Parameter]:
    """The optimizer's own state (moments, step count, ...) by name, without the parameters it updates."""
    own = {id(p) for p in optimizer.parameters}
    return {name: p for name, p in optimizer.parameters_and_names() if id(p) not in own}


@dataclass
class MicroStep:
    """What one micro-batch did, as the loop needs it; device values stay unread until a log line needs them."""

    updated: bool                 # this micro-batch completed an optimizer update (the last of grad_accum)
    skipped: int = 0              # updates of it skipped as non-finite (several with several optimizers)
    logs: Any = None              # this micro-batch's loss terms, averaged over the log window by ``_log_record``
    norms: Tuple[Any, ...] = ()   # the update's gradient norms (Tensor, or None for an optimizer that did not step)


class TrainerBase:
    """Shared state, I/O and training loop of a trainer over an ``ImageSource``; subclasses implement
    ``_state_groups``, ``_train_micro_batch``, ``_log_record`` and ``_export_weights`` (the other hooks have defaults).

    ``config`` needs ``num_steps``, ``batch_size``, ``grad_accum``, ``log_every``, ``save_every``, ``keep_last``,
    ``progress`` and ``export_safetensors``; ``meta`` (e.g. the experiment config) goes into every checkpoint.
    Only ``rank == 0`` writes files.
    """

    #: micro-batches carry captions instead of labels (a text-conditional model; set by the subclass)
    captions: bool = False

    progress_desc = "train"   # the progress bar's description

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
        self.bad_streak = 0      # consecutive updates with a non-finite loss or gradient (skipped)
        self._save_pending = False  # a periodic save waiting for the end of a bad streak
        self._log_checked = False   # log.jsonl lines past the resumed step dropped (at this session's first line)
        self._start_step = 0        # the step this session started from (0, or the resumed checkpoint's)
        self._history: List[Tuple[int, float]] = []
        self._resumed: Optional[Tuple[Any, Optional[Path]]] = None  # (resume argument, checkpoint) once resumed

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
                "batch_in_epoch": self.batch_in_epoch, "overflows": self.overflows, "bad_streak": self.bad_streak,
                **self._extra_state(),
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

    def load(self, path, loaded: Optional[Tuple[Dict[str, np.ndarray], Dict[str, Any]]] = None) -> None:
        """Restore the training state from checkpoint ``path`` (``loaded``: its (arrays, meta) if already read)."""
        arrays, meta = loaded if loaded is not None else load_checkpoint(path)
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
                p.set_data(Tensor(arrays[f"{group}.{name}"].astype(numpy_dtype(p), copy=False), dtype=p.dtype))
        self.step, self.overflows = int(meta["step"]), int(meta.get("overflows", 0))
        self.bad_streak = int(meta.get("bad_streak", 0))
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
        """``resume`` is a checkpoint path, ``"auto"`` (latest in out_dir, if any) or None.

        Done once: a second call with the same argument returns the same checkpoint without loading it again
        (train.py resumes before it writes the run folder -- a checkpoint that does not fit the model is
        refused first -- and then calls ``fit``, which resumes too)."""
        if self._resumed is not None and self._resumed[0] == resume:
            return self._resumed[1]
        path, loaded = None, None
        if resume == "auto":   # the newest checkpoint that reads: a truncated newer one is named and skipped
            found = newest_readable_checkpoint(self.out_dir / "checkpoints", log=self.log)
            if found is None:
                self.log(f"no checkpoint in {self.out_dir / 'checkpoints'}; starting from scratch")
            else:
                path, loaded = found[0], found[1:]
        elif resume:
            path = Path(resume)
        if path is not None:
            self.load(path, loaded)
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
        self._resumed = (resume, path)
        self._start_step = self.step
        return path

    def check_replicas(self, when: str) -> None:
        """Data parallel: raise unless every rank holds bit-identical training state (a collective)."""
        arrays = {f"{group}.{name}": p.asnumpy() for group, params in self._state_groups().items()
                  for name, p in params.items()}
        check_replicas(arrays, self.step, self.epoch, self.batch_in_epoch, when)

    # ------------------------------------------------------------------ stopping: signals and divergence

    def _stop_signals(self):
        """The loop's context (``training.interrupt.graceful_stop``): the first SIGINT / SIGTERM sets ``.signum``
        and the loop stops after its step with a checkpoint (``_stop_if_asked``); a second aborts at once.
        Single process only: the ranks of a data-parallel run could not agree on a step to stop at, so
        there a signal keeps its immediate effect."""
        def cleanup():
            for folder in (self.out_dir, self.out_dir / "checkpoints"):
                remove_temporaries(folder)
        return graceful_stop(enabled=self.world_size == 1, cleanup=cleanup, folder=self.out_dir)

    def _stop_if_asked(self, stop, saved: Optional[Path] = None) -> None:
        """Between updates: after a stop signal, save this step (unless ``saved`` already holds it) and raise
        ``TrainingInterrupted``. Before this session's first update there is nothing new to save."""
        if stop.signum is None:
            return
        if self.step == self._start_step:
            raise TrainingInterrupted(stop.signum, self.step, self._resumed[1] if self._resumed else None)
        path = saved if saved is not None else self.save()
        self._write_plots()
        self._log_line({"step": self.step, "event": "interrupted", "signal": signal_name(stop.signum),
                        "checkpoint": str(path), "time": time.time()})
        raise TrainingInterrupted(stop.signum, self.step, path)

    def _track_update(self, finite: bool) -> None:
        """Count consecutive skipped updates (a non-finite loss or gradient); ``max_bad_steps`` of them in a
        row stop the run with ``TrainingDiverged``, without saving. Uses only the all-reduced finiteness
        flag, so every rank of a data-parallel run decides alike."""
        if finite:
            self.bad_streak = 0
            return
        self.bad_streak += 1
        limit = int(getattr(self.cfg, "max_bad_steps", 0) or 0)
        if not limit or self.bad_streak < limit:
            return
        first = self.step - self.bad_streak + 1
        saved = list_checkpoints(self.out_dir / "checkpoints")
        self._log_line({"step": self.step, "event": "diverged", "bad_steps": self.bad_streak, "time": time.time()})
        self._write_plots()
        newest = (f"the newest checkpoint, {saved[-1][1]} (step {saved[-1][0]}), is the last good state"
                  if saved else "no checkpoint had been written yet")
        raise TrainingDiverged(
            f"training diverged: all {self.bad_streak} updates of steps {first}-{self.step} had a non-finite loss or "
            f"gradient and were skipped (train.max_bad_steps={limit}); stopped without saving, {newest}. Lower "
            f"train.lr (now {self.cfg.lr:g}) or keep train.clip_grad_norm on; with fp16 loss scaling, a longer streak "
            f"while the loss scale settles is normal: raise train.max_bad_steps",
            step=self.step, bad_steps=self.bad_streak, checkpoint=saved[-1][1] if saved else None)

    def _save_due(self) -> bool:
        """Whether to save after this update: every ``save_every`` updates and at the end; a save that falls in a
        streak of skipped updates waits for the streak to end, so a diverging state is never saved (except at
        the last step)."""
        cfg = self.cfg
        self._save_pending = self._save_pending or self.step % cfg.save_every == 0 or self.step >= cfg.num_steps
        if self._save_pending and (self.bad_streak == 0 or self.step >= cfg.num_steps):
            self._save_pending = False
            return True
        return False

    # ------------------------------------------------------------------ the loop

    def fit(self, resume=None) -> Dict[str, Any]:
        """Train until ``num_steps`` updates; returns a summary (``_summary``: final loss, img/s, paths)."""
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.resume(resume)
        self._load_history()
        cfg = self.cfg
        images_per_update = cfg.batch_size * cfg.grad_accum * self.world_size
        bar = tqdm(total=cfg.num_steps, initial=self.step, disable=not (cfg.progress and self.is_main),
                   desc=self.progress_desc, dynamic_ncols=True)
        window: List[MicroStep] = []
        t_last, steps_last = time.perf_counter(), self.step
        record: Dict[str, Any] = {}
        batches = self._batches()
        with self._stop_signals() as stop, closing(bar):
            self._stop_if_asked(stop)
            while self.step < cfg.num_steps:
                images, labels = next(batches)
                micro = self._train_micro_batch(images, labels)
                window.append(micro)
                if not micro.updated:
                    continue  # accumulating micro-batches
                self.step += 1
                self.overflows += micro.skipped
                self._after_update()
                bar.update(1)
                if self._due(cfg.log_every):
                    now = time.perf_counter()
                    img_per_s = (self.step - steps_last) * images_per_update / max(now - t_last, 1e-9)
                    t_last, steps_last = now, self.step
                    record = self._log_record(window, img_per_s)
                    window.clear()
                    self._history.append((self.step, record["loss"]))
                    self._log_line(record)
                    bar.set_postfix(**self._progress_postfix(record))
                self._track_update(micro.skipped == 0)   # max_bad_steps skipped updates in a row: TrainingDiverged
                self._periodic_evaluation()   # before saving, so the checkpoint knows the best so far
                saved = None
                if self._save_due():
                    saved = self.save()
                    self._write_plots()
                self._periodic_outputs()
                self._stop_if_asked(stop, saved)   # after SIGINT / SIGTERM: TrainingInterrupted, with a checkpoint
        summary = self._summary(record)
        if self.is_main and cfg.export_safetensors:
            summary["safetensors"] = str(self._export_weights())
        return summary

    def _due(self, every: int) -> bool:
        """Whether something done every ``every`` updates (0: never) is due after this update; always at the end."""
        return bool(every) and (self.step % every == 0 or self.step == self.cfg.num_steps)

    # ------------------------------------------------------------------ hooks of the loop

    def _train_micro_batch(self, images: np.ndarray, labels: np.ndarray) -> MicroStep:
        """Run one micro-batch (images (B, C, H, W) in [0, 1], labels (B,)) through the compiled step(s); the
        host randomness it needs comes from ``self.rng``. ``self.step`` is still the number of updates before it."""
        raise NotImplementedError

    def _after_update(self) -> None:
        """After each optimizer update (``self.step`` already counts it), before its log line."""

    def _log_record(self, window: List[MicroStep], img_per_s: float) -> Dict[str, Any]:
        """The log.jsonl line of this update, from the micro-batches since the last one (``window[-1]`` completed
        this update). Must hold ``"loss"`` (the loss plot's value)."""
        raise NotImplementedError

    def _progress_postfix(self, record: Dict[str, Any]) -> Dict[str, str]:
        """The progress bar's postfix for a log line."""
        return {"loss": f"{record['loss']:.4f}", "img_s": f"{record['img_per_s']:.1f}"}

    def _periodic_evaluation(self) -> None:
        """After each update, before a save that falls on it (so that the checkpoint can hold its result)."""

    def _periodic_outputs(self) -> None:
        """After each update and its save (sample grids and the like)."""

    def _summary(self, record: Dict[str, Any]) -> Dict[str, Any]:
        """What ``fit`` returns, from the last log line of this session (``{}`` if none), before the export."""
        return {"step": self.step, "loss": record.get("loss", float("nan")), "img_per_s": record.get("img_per_s", 0.0),
                "overflows": self.overflows, "out_dir": str(self.out_dir)}

    def _export_weights(self) -> Path:
        """Write ``model.safetensors`` (the weights for inference) at the end of ``fit``; returns its path."""
        raise NotImplementedError

    # ------------------------------------------------------------------ data and logs

    def _batches(self) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """Micro-batches from the saved position on, across epochs; advances the position."""
        bs = self.cfg.batch_size
        if self.source.batches_per_epoch(bs) < 1:
            raise ValueError(f"the dataset has {self.source.num_samples} images per device, fewer than one batch "
                             f"of {bs}; lower train.batch_size or add data")
        while True:
            text = {"captions": True} if self.captions else {}
            for batch in self.source.epoch(self.epoch, bs, start_batch=self.batch_in_epoch, **text):
                self.batch_in_epoch += 1
                yield batch[0], batch[-1]   # (images, labels), or (images, captions) for a text-conditional model
            self.epoch += 1
            self.batch_in_epoch = 0

    def _log_line(self, record: Dict[str, Any]) -> None:
        if not self.is_main:
            return
        if not self._log_checked:
            self._drop_stale_log_lines()
        with open(self.out_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _drop_stale_log_lines(self) -> None:
        """Before this session's first log line: drop the lines past the step it started from (written after
        that checkpoint by a run that was killed) and lines cut short, so that log.jsonl tells one history."""
        self._log_checked = True
        log = self.out_dir / "log.jsonl"
        if not log.is_file():
            return
        text = log.read_text()
        kept, dropped = [], 0
        for line in text.splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                rec = None
            if not isinstance(rec, dict) or int(rec.get("step", 0)) > self._start_step:
                dropped += 1
                continue
            kept.append(line)
        if not dropped and (not text or text.endswith("\n")):
            return
        tmp = log.with_name(f".{log.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, log)
        self.log(f"log.jsonl: dropped {dropped} line(s) past step {self._start_step} (written after the checkpoint "
                 f"this run continues from, or cut short)")

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
