#!/usr/bin/env python
"""Sample quality per CPU minute of training (issue 18): our recipes against the PyTorch anchor.

    python bench/quality_per_minute.py                              # 30 min per recipe, all four recipes
    python bench/quality_per_minute.py --minutes 1 --eval-every 0.5 --eval-num 100 --final-nfe 10 \\
        --final-samplers ddim,heun,flow_euler                       # smoke test: a few minutes in all

Every recipe trains for the same wall-clock budget (``--minutes``) on this machine, one after the other,
each in a fresh subprocess (a fresh MindSpore / PyTorch runtime, no memory carried over):

* ``vpred``      -- ``configs/fashion_mnist_vpred.yaml`` (the default until 2026-12-06: lucidrains-style U-Net
  dim 16, v-prediction, cosine schedule, min-SNR weighting, batch 32, lr 5e-4 with a cosine decay; called
  ``default`` in the result files of before that date);
* ``edm``        -- ``configs/fashion_mnist_edm.yaml`` (same network and training, EDM objective);
* ``flow``       -- ``configs/fashion_mnist_fast.yaml`` (the shipped default since 2026-12-06: flow matching;
  since 2026-12-07 with attention 2 heads x 16 wide instead of 4 x 32, and lr 1e-3);
* ``flow32``     -- (only when named) the default config with a wider U-Net, ``model.dim=32`` (2.6 M weights);
* ``lucidrains`` -- the PyTorch anchor, ``denoising_diffusion_pytorch`` ``Unet(dim=32, dim_mults=(1, 2, 4),
  channels=1)`` in ``GaussianDiffusion(model, image_size=28)`` with its defaults (pred_v, sigmoid schedule,
  1000 timesteps), Adam lr 2e-4 betas (0.9, 0.99), batch 64, gradient-norm clip 1.0, ``ema_pytorch.EMA(beta=0.995,
  update_every=10)``, random horizontal flips, ``torch.set_num_threads(2)``: lucidrains' Trainer settings written
  as a plain torch loop (its Trainer class needs accelerate and an image folder). Note that Trainer's own
  default ``train_lr`` is 1e-4; the anchor here uses 2e-4 (``--torch-lr``).

All recipes train on the real Fashion-MNIST train split (our recipes through the library's data source, as
``train.py``; the anchor on the same images read into memory, in [0, 1]).

The clock
---------
The training clock of a recipe starts before anything of it is built and counts everything train.py would
do: reading the config, building the networks, the data pipeline, graph compilation and the first step,
then every update (data, host noise, the compiled step, EMA, log lines). Not counted: starting the
process and importing the frameworks, loading the feature extractor and the reference statistics, and
the evaluations -- **the training clock is paused while an evaluation runs** -- and whatever follows the
last update (the final checkpoint, the final evaluations).

Our recipes use the cosine learning-rate schedule, which needs the number of updates up front. So each
first runs a short calibration in a throwaway process (not counted: ``--calibration-steps`` updates after
20 warm-up updates give seconds per update, and the time to the first update estimates the real run's
start-up); the real run's first plan is ``(budget - start-up) / seconds per update`` updates (``warmup_steps``
and ``ema_update_after_step`` are cut to 10 % of that when they exceed it). A calibration is not enough on its
own: the seconds per update of one process differ from the next one's by up to 20 % on this 2-core machine
(274 ms calibrated against 230 ms in the run, and 238 against 289 in another), so a schedule planned from it
either ended minutes before the budget (26.3 of 30 min) or was cut off by the budget well before its end. So
every ``--replan-every`` updates (50; 0 turns it off) the run re-plans the end of its cosine decay from its own
seconds per update over the last 200 updates and the training clock left: ``total = step + (budget - clock) /
seconds per update``. The schedule's end lives in a scalar Parameter of a stand-in for the trainer's schedule
(``_replanned_schedule_builder``), so the compiled step reads the new value without recompiling; the learning
rate reaches its minimum as the budget runs out. Without re-planning the plan has a 5 % surplus (``STEP_MARGIN``)
and the budget stops the run. The budget is enforced after every update: when it is spent, training stops after
that update. The anchor has a constant learning rate and simply trains until the budget is spent. Either way
the last update is the one that reaches the budget, so a recipe may overrun it by up to one update (the
minutes are reported).

Evaluation
----------
Fréchet distance (lower is better) of ``--eval-num`` images from the EMA weights against the Fashion-MNIST
train split, in the feature space of the project's shipped Fashion-MNIST classifier
(``ms_diffusion.evaluation.SampleEvaluator``; the anchor's images go through the same extractor and
reference). Every evaluation draws its images from seed ``--seed`` (the same initial noise for our recipes;
torch's own generator for the anchor). Every ``--eval-every`` minutes of training clock a recipe is
evaluated with its cheapest sensible ~20-evaluation sampler (vpred: DDIM 20; edm: Heun 10 steps = 19
network evaluations; flow: flow-matching Euler 20; anchor: its own DDIM 20), and once more at the end.
Then the final EMA model is evaluated with every sampler of ``--final-samplers`` at each ``--final-nfe``
(network evaluations; Heun takes (NFE + 1) // 2 steps = 2 * steps - 1 evaluations, and the table shows the
NFE it actually used in brackets where it differs); the anchor only with its DDIM. A sampler that does not
apply to a recipe is reported as ``n/a``. The EMA weights follow each recipe's own rule: until
``ema_update_after_step`` updates (100 in our configs unless cut for a short budget, 100 in ema-pytorch)
the EMA copy just tracks the online weights (the anchor's every 10 updates, ours every update), so an
evaluation that early sees (nearly) the online weights.

With the defaults expect roughly 5 to 6 hours on a 2-core CPU: 4 x 30 min of training, the rest is
evaluation (each of our recipes' final table alone is 6 samplers x 80 network evaluations of 1000 images).
``--final-samplers``, ``--final-nfe`` and ``--eval-num`` trim it.

Reading the tables
------------------
The first table is FD against minutes of training clock per recipe (the columns are the evaluation marks;
``end`` is the last update, at the minutes shown): how fast a recipe gets good on this CPU. The second
gives the final FD per recipe, sampler and NFE. The third: parameters, updates done (of those planned),
training images/s (steady state, after the first update), the time to the first update (build + data +
compile + first step) and why training stopped. FD at a few hundred samples is biased upwards: compare
rows of one run (same ``--eval-num``), not numbers from runs with other sample counts. Timings are only
meaningful on an otherwise idle machine. Everything is written to ``--json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import ms_diffusion  # noqa: F401  (CPU workaround before MindSpore makes kernels)
from ms_diffusion.cli.common import UsageError, make_parser, run_command

ROOT = Path(__file__).resolve().parent.parent

RECIPES: Dict[str, Dict[str, Any]] = {
    "vpred": {"config": "fashion_mnist_vpred", "periodic": ("ddim", 20),
              "description": "configs/fashion_mnist_vpred.yaml: U-Net dim 16, v-pred, cosine schedule, min-SNR, "
                             "batch 32, lr 5e-4 cosine (the default until 2026-12-06)"},
    "edm": {"config": "fashion_mnist_edm", "periodic": ("heun", 10),
            "description": "configs/fashion_mnist_edm.yaml: same network and training, EDM objective"},
    "flow": {"config": "fashion_mnist_fast", "periodic": ("unipc", 20),
             "description": "configs/fashion_mnist_fast.yaml (the default): flow matching, the same U-Net with "
                            "attention 2 x 16 wide instead of 4 x 32, lr 1e-3 (since 2026-12-07), no random flips, UniPC "
                            "(since 2026-12-07, later)"},
    "flow32": {"config": "fashion_mnist_fast", "overrides": ["model.dim=32"], "periodic": ("flow_euler", 20),
               "extra": True, "description": "the default config with a wider U-Net (dim 32, 2.6 M weights)"},
    "lucidrains": {"config": None, "periodic": ("ddim", 20),
                   "description": "denoising_diffusion_pytorch Unet(dim=32, dim_mults=(1, 2, 4)) + GaussianDiffusion "
                                  "defaults (pred_v, sigmoid, T=1000), Adam 2e-4, batch 64, EMA 0.995/10 (PyTorch)"},
}
DEFAULT_SAMPLERS = "ddim,dpmpp,euler,heun,unipc,flow_euler"
WARMUP_UPDATES = 20        # calibration: updates before seconds per update are measured
STEP_MARGIN = 1.05         # planned updates = budget / seconds per update * this (without --replan-every)
REPLAN_WINDOW = 200        # re-planning: seconds per update measured over this many recent updates
TORCH_BATCH = 64
_TITLES = {"ddim": "DDIM", "dpmpp": "DPM-Solver++", "dpmpp_sde": "DPM-Solver++ SDE", "euler": "Euler",
           "euler_a": "Euler a", "heun": "Heun", "unipc": "UniPC", "flow_euler": "Flow Euler", "plms": "PLMS",
           "ddpm": "DDPM"}


def nfe_of(sampler: str, steps: int) -> int:
    """Network evaluations of ``sampler`` with ``steps`` steps."""
    if sampler == "heun":
        return 2 * steps - 1
    if sampler == "plms":
        return steps + 1
    return steps


def steps_for(sampler: str, nfe: int) -> int:
    """Steps of ``sampler`` that use at most (Heun: about) ``nfe`` network evaluations."""
    return max((nfe + 1) // 2, 1) if sampler == "heun" else nfe


def sampler_label(sampler: str, steps: int) -> str:
    return f"{_TITLES.get(sampler, sampler)} {steps}" + (f" ({nfe_of(sampler, steps)} NFE)"
                                                          if nfe_of(sampler, steps) != steps else "")


# ---------------------------------------------------------------------------------------------- the clock


class BudgetClock:
    """The training clock: wall time since ``start``, less the evaluations (``paused``).

    ``tick(step)`` after every update: records the time, runs ``evaluate`` (clock paused) when an
    evaluation mark has been passed, and returns True once the budget is spent (stop after this update).
    """

    def __init__(self, budget_s: float, every_s: float, evaluate: Optional[Callable[[], Dict[str, Any]]],
                 label: str = ""):
        self.start = time.perf_counter()
        self.budget_s, self.every_s = float(budget_s), float(every_s)
        self.evaluate, self.label = evaluate, label
        self.paused = 0.0
        self.next_mark = self.every_s if self.every_s > 0 else math.inf
        self.times: List[float] = []   # training clock after each update
        self.curve: List[Dict[str, Any]] = []
        self.stopped_by: Optional[str] = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.paused

    def tick(self, step: int) -> bool:
        now = self.elapsed()
        self.times.append(now)
        if now >= self.budget_s:
            self.stopped_by = "budget"
            return True
        if now >= self.next_mark and self.next_mark < self.budget_s and self.evaluate is not None:
            self.run_eval(step, mark_s=self.next_mark)
            while self.next_mark <= now:
                self.next_mark += self.every_s
        return False

    def run_eval(self, step: int, mark_s: Optional[float]) -> Dict[str, Any]:
        """Evaluate now, with the clock paused; appended to ``curve`` (``mark_s`` None: the end)."""
        at = self.times[-1] if self.times else self.elapsed()
        t = time.perf_counter()
        try:
            result = dict(self.evaluate())
        except Exception as err:  # a failed evaluation (e.g. NaN images) must not lose the run
            result = {"fd": None, "error": f"{type(err).__name__}: {err}"}
        seconds = time.perf_counter() - t
        self.paused += seconds
        record = {"mark_min": None if mark_s is None else mark_s / 60, "minutes": at / 60, "step": step,
                  "eval_seconds": seconds, **result}
        self.curve.append(record)
        fd = "failed: " + result["error"] if result.get("fd") is None else f"FD {result['fd']:.3f}"
        print(f"[{self.label}] {'end' if mark_s is None else f'{mark_s / 60:g} min mark'}: {at / 60:.2f} min of "
              f"training, step {step}: {fd} ({seconds:.0f} s, clock paused)", flush=True)
        return record

    def summary(self, batch: int) -> Dict[str, Any]:
        """Updates, seconds, time to the first update and steady images/s."""
        n = len(self.times)
        first = self.times[0] if n else None
        last = self.times[-1] if n else 0.0
        steady = (n - 1) * batch / (last - first) if n > 1 and last > first else None
        return {"steps": n, "train_seconds": last, "startup_s": first, "img_per_s": steady,
                "images_seen": n * batch, "paused_eval_s": self.paused, "stopped_by": self.stopped_by or "num_steps"}


# ---------------------------------------------------------------------------------------------- evaluation


def _features_and_reference(args):
    from ms_diffusion.metrics.features import get_extractor
    from ms_diffusion.metrics.reference import reference_features

    extractor = get_extractor("classifier")
    if args.eval_num <= extractor.dim:
        raise UsageError(f"--eval-num ({args.eval_num}) must exceed the feature dimension ({extractor.dim}) of the "
                         f"{extractor.description}")
    reference = reference_features(extractor, "fashion_mnist", data_dir=args.data_dir, image_shape=(1, 28, 28),
                                   log=print)
    return extractor, reference


def _fd_of_images(images, extractor, reference) -> float:
    from ms_diffusion.metrics.features import fit_to_extractor
    from ms_diffusion.metrics.frechet import frechet_distance_from_features

    features = extractor(fit_to_extractor(images, extractor))
    return float(frechet_distance_from_features(features, reference.stats).value)


def _final_evals(args, recipe: str, evaluate: Callable[[str, int], Dict[str, Any]], samplers: List[str],
                 reuse: Dict[Tuple[str, int], Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Every (sampler, NFE) of the final table; a sampler that does not apply is ``n/a``, a failure ``error``."""
    rows = []
    for sampler in samplers:
        for nfe in args.final_nfe:
            steps = steps_for(sampler, nfe)
            row = {"sampler": sampler, "requested_nfe": nfe, "steps": steps, "nfe": nfe_of(sampler, steps)}
            if (sampler, steps) in reuse:
                row.update(reuse[(sampler, steps)], status="ok", reused="the end evaluation of the curve")
            else:
                t = time.perf_counter()
                try:
                    row.update(evaluate(sampler, steps), status="ok")
                except (ValueError, NotImplementedError) as err:
                    row.update(status="n/a", fd=None, message=str(err).splitlines()[0] if str(err) else "")
                except Exception as err:
                    import traceback
                    traceback.print_exc()
                    row.update(status="error", fd=None, message=f"{type(err).__name__}: {err}")
                row["eval_seconds"] = time.perf_counter() - t
            shown = f"FD {row['fd']:.3f}" if row.get("fd") is not None else f"{row['status']}: {row.get('message')}"
            print(f"[{recipe}] final {sampler_label(sampler, steps)}: {shown}", flush=True)
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- our recipes


def _our_overrides(recipe: str, args, num_steps: int, out_dir: str, calibrate: bool) -> List[str]:
    out = [f"train.num_steps={num_steps}", "train.sample_every=0", "train.eval_every=0",
           f"train.save_every={10 ** 9}", "train.progress=false", "train.export_safetensors=false",
           "train.keep_last=1", f"out_dir={out_dir}", f"seed={args.seed}"]
    if args.data_dir:
        out.append(f"data.data_dir={args.data_dir}")
    if calibrate:
        out.append("train.warmup_steps=0")
    return out


def _replanned_schedule_builder(planned: int, holder: Dict[str, Any]):
    """A stand-in for the trainer's ``build_lr_schedule`` that returns the warm-up + cosine schedule with its end
    movable (``replan(total_steps)``), first planned at ``planned`` updates; kept in ``holder["schedule"]``."""
    import mindspore as ms
    from mindspore import Tensor, ops

    from ms_diffusion.training.optim import WarmupCosineLR

    class ReplannedCosineLR(WarmupCosineLR):
        def __init__(self, max_lr: float, min_lr: float, warmup_steps: int):
            super().__init__(max_lr, min_lr, warmup_steps, planned)
            self.planned_decay = ms.Parameter(Tensor(self.decay_steps, ms.float32), name="bench_decay_steps",
                                              requires_grad=False)

        def construct(self, global_step):
            return self.lr_at(global_step, self.planned_decay)

        def replan(self, total_steps: float) -> None:
            # in place: a compiled graph does not see a Parameter's set_data (it keeps the old storage)
            ops.assign(self.planned_decay, Tensor(max(float(total_steps) - self.warmup, 1.0), ms.float32))

        def total_steps(self) -> float:
            return float(self.planned_decay.asnumpy()) + self.warmup

    def build(name: str, lr: float, *, warmup_steps: int = 0, total_steps: int = 1, min_lr: float = 0.0):
        assert name == "cosine", name
        holder["schedule"] = ReplannedCosineLR(lr, min_lr, warmup_steps)
        return holder["schedule"]

    return build


def _run_ours(args, recipe: str, phase: str) -> Dict[str, Any]:
    """One of our recipes in this process: ``calibrate`` (seconds per update) or ``train`` (the budgeted run)."""
    from ms_diffusion import runtime
    from ms_diffusion.config import load_config
    from ms_diffusion.evaluation import SampleEvaluator
    from ms_diffusion.experiment import build_data_source, build_diffusion, build_ema_copy
    from ms_diffusion.training import Trainer
    from ms_diffusion.training import trainer as trainer_module

    spec = RECIPES[recipe]
    calibrate = phase == "calibrate"
    info = runtime.setup("auto", "graph", args.seed)
    extractor = reference = None
    if not calibrate:
        extractor, reference = _features_and_reference(args)   # before the clock starts
    periodic = spec["periodic"]
    budget_s = math.inf if calibrate else args.minutes * 60
    planned = WARMUP_UPDATES + args.calibration_steps if calibrate else args.num_steps
    if not planned or planned < 1:
        raise UsageError("the train phase of a worker needs --num-steps (from the calibration)")

    with tempfile.TemporaryDirectory(prefix=f"qpm-{recipe}-") as tmp:
        holder: Dict[str, Any] = {}

        def evaluator(sampler: str, steps: int) -> Dict[str, Any]:
            ev = SampleEvaluator(extractor, reference, args.eval_num, batch_size=args.eval_batch, seed=args.seed,
                                 sample_options={"sampler": sampler, "steps": steps})
            result = ev(holder["trainer"].ema_diffusion)
            return {"fd": result["fd"], "sampler": sampler, "steps": steps, "nfe": nfe_of(sampler, steps)}

        clock = BudgetClock(budget_s, 0 if calibrate else args.eval_every * 60,
                            None if calibrate else (lambda: evaluator(*periodic)), label=recipe)
        # ---- the clock runs from here: config, networks, data pipeline, compile, updates
        recipe_overrides = list(spec.get("overrides", [])) + list(args.set or [])
        shipped = load_config(spec["config"], recipe_overrides).train
        replan = bool(args.replan_every) and not calibrate and shipped.lr_schedule == "cosine"
        # re-planned, the budget and not the step count ends the run (the schedule's end follows the clock)
        overrides = recipe_overrides + _our_overrides(recipe, args, 2 * planned + 100 if replan else planned, tmp,
                                                      calibrate)
        scaled = {}
        for key in ("warmup_steps", "ema_update_after_step"):
            value = getattr(shipped, key)
            if not calibrate and value > 0.1 * planned:   # a short budget: at most 10 % of the updates
                scaled[key] = (value, int(0.1 * planned))
                overrides.append(f"train.{key}={int(0.1 * planned)}")
        cfg = load_config(spec["config"], overrides)
        diffusion = build_diffusion(cfg)
        ema_diffusion = build_ema_copy(cfg, diffusion)
        source = build_data_source(cfg, diffusion)

        class BudgetTrainer(Trainer):
            def _after_update(self) -> None:
                super()._after_update()   # the EMA update
                if clock.tick(self.step):
                    self.cfg.num_steps = self.step   # TrainerBase.fit ends after this update
                elif replan and self.step % args.replan_every == 0 and len(clock.times) > REPLAN_WINDOW:
                    times = clock.times
                    per_update = (times[-1] - times[-1 - REPLAN_WINDOW]) / REPLAN_WINDOW
                    holder["schedule"].replan(self.step + (clock.budget_s - times[-1]) / per_update)

        if replan:
            trainer_module.build_lr_schedule = _replanned_schedule_builder(planned, holder)
        trainer = BudgetTrainer(diffusion, ema_diffusion, source, cfg.train, tmp, meta={"config": cfg.to_dict()},
                                seed=cfg.seed, log=lambda *_: None)
        holder["trainer"] = trainer
        build_s = clock.elapsed()
        fit = trainer.fit()
        # ---- the clock has stopped (the last tick); what follows is not training
        stats = clock.summary(cfg.train.batch_size)
        if replan:
            stats["replanned_total"] = holder["schedule"].total_steps()
        out = {"recipe": recipe, "phase": phase, "config": spec["config"], "description": spec["description"],
               "device": info.device, "params": int(sum(int(p.size) for p in diffusion.trainable_params())),
               "batch_size": cfg.train.batch_size, "calibrated_plan": planned, "build_s": build_s,
               "planned_steps": round(stats["replanned_total"]) if replan else planned,
               "final_loss": fit.get("loss"), "overrides": overrides,
               "scaled": {k: {"config": a, "used": b} for k, (a, b) in scaled.items()},
               "lr": cfg.train.lr, "lr_schedule": cfg.train.lr_schedule, **stats}
        if calibrate:
            times = clock.times
            if len(times) <= WARMUP_UPDATES + 1:
                raise RuntimeError(f"calibration of {recipe} made only {len(times)} updates")
            out["s_per_step"] = (times[-1] - times[WARMUP_UPDATES - 1]) / (len(times) - WARMUP_UPDATES)
            print(f"[{recipe}] calibration: {out['s_per_step'] * 1000:.0f} ms per update after "
                  f"{WARMUP_UPDATES} warm-up updates; {out['startup_s']:.1f} s to the first update", flush=True)
            return out
        print(f"[{recipe}] trained {stats['steps']} of {out['planned_steps']} planned updates in "
              f"{stats['train_seconds'] / 60:.2f} min of training clock (stopped by {stats['stopped_by']})", flush=True)
        end = clock.run_eval(trainer.step, mark_s=None)
        out["curve"] = clock.curve
        reuse = {(periodic[0], periodic[1]): {"fd": end["fd"]}} if end.get("fd") is not None else {}
        out["final"] = _final_evals(args, recipe, evaluator, args.final_samplers, reuse)
        out["periodic_sampler"] = {"sampler": periodic[0], "steps": periodic[1], "nfe": nfe_of(*periodic)}
        return out


# ---------------------------------------------------------------------------------------------- the PyTorch anchor


def _lucidrains_module():
    """``denoising_diffusion_pytorch.denoising_diffusion_pytorch`` through the test suite's loader
    (``tests.anchors.lucidrains``: stand-ins for its Trainer stack's imports), without its progress bar."""
    import pytest

    sys.path.insert(0, str(ROOT))
    from tests.anchors import lucidrains

    try:
        module = lucidrains()
    except pytest.skip.Exception:
        raise UsageError("the lucidrains recipe needs torch and denoising-diffusion-pytorch (pip install "
                         "denoising-diffusion-pytorch); leave it out with --recipes vpred,edm,flow") from None
    module.tqdm = lambda iterable=None, *a, **k: iterable   # no progress bar per sampling batch
    return module


def _run_lucidrains(args) -> Dict[str, Any]:
    import numpy as np
    import torch
    from ema_pytorch import EMA

    from ms_diffusion import runtime
    from ms_diffusion.metrics.data import load_dataset_arrays

    runtime.setup("auto", "graph", args.seed)
    torch.set_num_threads(2)
    ldm = _lucidrains_module()
    extractor, reference = _features_and_reference(args)   # before the clock starts
    holder: Dict[str, Any] = {}

    def evaluator(sampler: str, steps: int) -> Dict[str, Any]:
        if sampler != "ddim":
            raise ValueError(f"the anchor is sampled with its own DDIM only, not {sampler}")
        model = holder["ema"].ema_model
        if steps > model.num_timesteps:
            raise ValueError(f"{steps} DDIM steps exceed the {model.num_timesteps} timesteps")
        model.eval()
        model.sampling_timesteps, model.is_ddim_sampling, model.ddim_sampling_eta = steps, True, 0.0
        torch.manual_seed(args.seed)
        images, done = [], 0
        while done < args.eval_num:
            b = min(args.eval_batch, args.eval_num - done)
            images.append(model.sample(batch_size=b).clamp(0, 1).cpu().numpy())
            done += b
        return {"fd": _fd_of_images(np.concatenate(images).astype(np.float32), extractor, reference),
                "sampler": "ddim", "steps": steps, "nfe": steps}

    clock = BudgetClock(args.minutes * 60, args.eval_every * 60, lambda: evaluator("ddim", 20), label="lucidrains")
    # ---- the clock runs from here: data, networks, updates
    data = load_dataset_arrays("fashion_mnist", "train", data_dir=args.data_dir).images   # (N, 1, 28, 28) in [0, 1]
    torch.manual_seed(args.seed)
    unet = ldm.Unet(dim=32, dim_mults=(1, 2, 4), channels=1)
    diffusion = ldm.GaussianDiffusion(unet, image_size=28)
    opt = torch.optim.Adam(diffusion.parameters(), lr=args.torch_lr, betas=(0.9, 0.99))
    ema = EMA(diffusion, beta=0.995, update_every=10)
    holder["ema"] = ema
    rng = np.random.default_rng([args.seed, 1])
    n, step, epoch = len(data), 0, 0
    build_s = clock.elapsed()
    diffusion.train()
    stop = False
    while not stop:
        order = rng.permutation(n)   # a DataLoader with shuffle=True, drop_last=True
        for i in range(n // TORCH_BATCH):
            x = data[order[i * TORCH_BATCH:(i + 1) * TORCH_BATCH]].copy()
            flip = rng.random(TORCH_BATCH) < 0.5
            x[flip] = x[flip][..., ::-1]
            loss = diffusion(torch.from_numpy(x))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(diffusion.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            ema.update()
            step += 1
            if clock.tick(step):
                stop = True
                break
        epoch += 1
    # ---- the clock has stopped
    stats = clock.summary(TORCH_BATCH)
    print(f"[lucidrains] trained {step} updates in {stats['train_seconds'] / 60:.2f} min of training clock", flush=True)
    end = clock.run_eval(step, mark_s=None)
    reuse = {("ddim", 20): {"fd": end["fd"]}} if end.get("fd") is not None else {}
    final = _final_evals(args, "lucidrains", evaluator, ["ddim"], reuse)
    version = sys.modules["denoising_diffusion_pytorch.version"].__version__
    return {"recipe": "lucidrains", "phase": "train", "config": None, "description": RECIPES["lucidrains"]["description"],
            "device": "CPU (torch, 2 threads)", "torch": torch.__version__,
            "denoising_diffusion_pytorch": version,
            "params": int(sum(p.numel() for p in diffusion.parameters() if p.requires_grad)),
            "batch_size": TORCH_BATCH, "planned_steps": None, "build_s": build_s, "final_loss": float(loss.item()),
            "lr": args.torch_lr, "lr_schedule": "constant", "epochs": epoch, **stats, "curve": clock.curve,
            "final": final, "periodic_sampler": {"sampler": "ddim", "steps": 20, "nfe": 20}}


# ---------------------------------------------------------------------------------------------- tables


def _fmt_fd(value) -> str:
    return "—" if value is None else f"{value:.2f}"


def marks_of(args) -> List[float]:
    """Evaluation marks (minutes) before the end of the budget."""
    if args.eval_every <= 0:
        return []
    out, k = [], 1
    while k * args.eval_every < args.minutes - 1e-9:
        out.append(k * args.eval_every)
        k += 1
    return out


def format_tables(results: Dict[str, Dict[str, Any]], args) -> str:
    marks = marks_of(args)
    lines = [f"FD of the EMA model (classifier features, N={args.eval_num}) vs minutes of training clock "
             f"(paused during evaluations)", ""]
    head = ["recipe", "sampler"] + [f"{m:g} min" for m in marks] + ["end"]
    lines += ["| " + " | ".join(head) + " |", "|---|---" + "|---:" * (len(head) - 2) + "|"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} |" + " |" * (len(head) - 2))
            continue
        by_mark = {round(p["mark_min"], 6): p for p in r["curve"] if p["mark_min"] is not None}
        end = [p for p in r["curve"] if p["mark_min"] is None]
        ps = r["periodic_sampler"]
        cells = [name, sampler_label(ps["sampler"], ps["steps"])]
        cells += [_fmt_fd(by_mark[round(m, 6)]["fd"]) if round(m, 6) in by_mark else "—" for m in marks]
        cells.append(f"{_fmt_fd(end[0]['fd'])} ({end[0]['minutes']:.1f} min)" if end else "—")
        lines.append("| " + " | ".join(cells) + " |")

    lines += ["", f"Final EMA model: FD (N={args.eval_num}) by sampler and network evaluations (actual NFE in "
                  f"brackets where it differs)", ""]
    head = ["recipe", "sampler"] + [f"NFE {n}" for n in args.final_nfe]
    lines += ["| " + " | ".join(head) + " |", "|---|---" + "|---:" * (len(head) - 2) + "|"]
    for name, r in results.items():
        if "error" in r:
            continue
        samplers = list(dict.fromkeys(row["sampler"] for row in r["final"]))
        for s in samplers:
            cells = [name, _TITLES.get(s, s)]
            for n in args.final_nfe:
                row = next((x for x in r["final"] if x["sampler"] == s and x["requested_nfe"] == n), None)
                if row is None:
                    cells.append("—")
                elif row["status"] != "ok":
                    cells.append(row["status"])
                else:
                    cells.append(_fmt_fd(row["fd"]) + (f" ({row['nfe']})" if row["nfe"] != n else ""))
            lines.append("| " + " | ".join(cells) + " |")

    lines += ["", "Training", ""]
    head = ["recipe", "params", "batch", "updates (planned)", "img/s", "to first update s", "trained min",
            "evals s (paused)", "stopped by"]
    lines += ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 2) + "|---|"]
    for name, r in results.items():
        if "error" in r:
            continue
        planned = f" ({r['planned_steps']})" if r.get("planned_steps") else ""
        ips = "—" if r.get("img_per_s") is None else f"{r['img_per_s']:.1f}"
        first = "—" if r.get("startup_s") is None else f"{r['startup_s']:.1f}"
        lines.append(f"| {name} | {r['params'] / 1e6:.2f}M | {r['batch_size']} | {r['steps']}{planned} | {ips} | "
                     f"{first} | {r['train_seconds'] / 60:.2f} | {r['paused_eval_s']:.0f} | {r['stopped_by']} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- driver


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("quality_per_minute.py", "FD of each recipe's EMA model vs CPU minutes of training, and of the "
                                             "final model per sampler and NFE (issue 18).")
    p.add_argument("--minutes", type=float, default=30.0, help="training budget per recipe (default 30)")
    p.add_argument("--eval-every", type=float, default=5.0,
                   help="minutes of training clock between evaluations (default 5; 0: only at the end)")
    p.add_argument("--eval-num", type=int, default=1000, help="images per evaluation (default 1000)")
    p.add_argument("--eval-batch", type=int, default=250, help="sampling batch size of the evaluations")
    usual = [r for r, spec in RECIPES.items() if not spec.get("extra")]
    p.add_argument("--recipes", default=",".join(usual),
                   help=f"comma list of {', '.join(RECIPES)} (default {', '.join(usual)})")
    p.add_argument("--final-nfe", default="10,20,50", help="network evaluations of the final evaluations")
    p.add_argument("--final-samplers", default=DEFAULT_SAMPLERS,
                   help=f"samplers of the final evaluations, our recipes (default {DEFAULT_SAMPLERS}); the "
                        f"lucidrains anchor always uses its own DDIM")
    p.add_argument("--calibration-steps", type=int, default=120,
                   help=f"updates timed (after {WARMUP_UPDATES} warm-up updates) to plan our recipes' num_steps")
    p.add_argument("--replan-every", type=int, default=50, metavar="N",
                   help="every N updates re-plan a cosine schedule's end from the run's own recent seconds per "
                        "update, so that it ends with the budget (0: keep the calibration's plan)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a config override for each of our recipes (repeatable), e.g. --set train.batch_size=64; "
                        "applied after the recipe's own, before the bench's (num_steps, out_dir, ...)")
    p.add_argument("--torch-lr", type=float, default=2e-4, help="the anchor's Adam learning rate (default 2e-4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="bench/results/quality_per_minute.json", help="raw numbers and tables")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: found automatically)")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    # one recipe in a subprocess (internal)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--phase", default="train", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--num-steps", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _check_args(args) -> None:
    from ms_diffusion.samplers import resolve_sampler

    recipes = [r.strip() for r in str(args.recipes).split(",") if r.strip()]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown or not recipes:
        raise UsageError(f"unknown recipe(s) {unknown}; choose from {', '.join(RECIPES)}")
    args.recipes = recipes
    try:
        args.final_nfe = [int(x) for x in str(args.final_nfe).split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--final-nfe must be a comma list of integers, got {args.final_nfe!r}") from None
    if not args.final_nfe or min(args.final_nfe) < 1:
        raise UsageError("--final-nfe needs at least one number of evaluations >= 1")
    args.final_samplers = list(dict.fromkeys(resolve_sampler(s.strip()) for s in str(args.final_samplers).split(",")
                                             if s.strip()))
    if args.minutes <= 0 or args.eval_every < 0 or args.eval_num < 2 or args.eval_batch < 1:
        raise UsageError("--minutes must be > 0, --eval-every >= 0, --eval-num >= 2, --eval-batch >= 1")


def _worker_argv(args, recipe: str, phase: str, out: str, num_steps: Optional[int] = None) -> List[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", recipe, "--phase", phase, "--worker-out", out,
            "--minutes", repr(args.minutes), "--eval-every", repr(args.eval_every), "--eval-num", str(args.eval_num),
            "--eval-batch", str(args.eval_batch), "--final-nfe", ",".join(map(str, args.final_nfe)),
            "--final-samplers", ",".join(args.final_samplers), "--calibration-steps", str(args.calibration_steps),
            "--torch-lr", repr(args.torch_lr), "--seed", str(args.seed), "--replan-every", str(args.replan_every)]
    if args.data_dir:
        argv += ["--data-dir", str(args.data_dir)]
    for item in args.set or []:
        argv += ["--set", item]
    if num_steps is not None:
        argv += ["--num-steps", str(num_steps)]
    if args.debug:
        argv.append("--debug")
    return argv


def _run_worker(args, recipe: str, phase: str, num_steps: Optional[int] = None) -> Dict[str, Any]:
    """Run one recipe's phase in a fresh process; its result, or {"error": ...}."""
    env = dict(os.environ)
    env.setdefault("GLOG_v", "3")   # MindSpore: errors only (no recompilation warnings between the lines)
    with tempfile.TemporaryDirectory(prefix="qpm-") as tmp:
        out = os.path.join(tmp, "result.json")
        t = time.perf_counter()
        proc = subprocess.run(_worker_argv(args, recipe, phase, out, num_steps), env=env)
        wall = time.perf_counter() - t
        if proc.returncode == 2:
            raise UsageError(f"{recipe} ({phase}) stopped with a usage error (above)")
        if proc.returncode != 0 or not os.path.exists(out):
            return {"error": f"{phase} process exited with status {proc.returncode}", "wall_s": wall}
        result = json.loads(Path(out).read_text())
        result["wall_s"] = wall
        return result


def _host() -> Dict[str, Any]:
    import mindspore

    return {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "mindspore": mindspore.__version__}


def _write_json(path: Path, args, results, tables: Optional[str], started: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("minutes", "eval_every", "eval_num", "eval_batch", "recipes",
                                               "final_nfe", "final_samplers", "calibration_steps", "torch_lr",
                                               "seed", "data_dir", "set")}
    doc = {"bench": "quality_per_minute", "settings": settings, "host": _host(),
           "clock": "training clock from before the build to the last update, paused during evaluations; "
                    "calibration, imports, reference statistics and final evaluations not counted",
           "features": "fmnist-classifier (shipped)", "wall_s": time.perf_counter() - started,
           "recipes": results, "tables": tables}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=2, default=float))
    os.replace(tmp, path)


def _run(args) -> int:
    _check_args(args)
    if args.worker:   # one recipe, in this (fresh) process
        if args.worker == "lucidrains":
            result = _run_lucidrains(args)
        else:
            result = _run_ours(args, args.worker, args.phase)
        Path(args.worker_out).write_text(json.dumps(result, default=float))
        return 0

    started = time.perf_counter()
    budget_s = args.minutes * 60
    print(f"quality per CPU minute: {', '.join(args.recipes)}; {args.minutes:g} min of training clock each "
          f"(paused during evaluations), FD of {args.eval_num} EMA samples every {args.eval_every:g} min and at the "
          f"end; final NFE {','.join(map(str, args.final_nfe))} with {', '.join(args.final_samplers)}", flush=True)
    results: Dict[str, Dict[str, Any]] = {}
    json_path = Path(args.json)
    for recipe in args.recipes:
        print(f"\n=== {recipe}: {RECIPES[recipe]['description']}", flush=True)
        if recipe == "lucidrains":
            result = _run_worker(args, recipe, "train")
        else:
            cal = _run_worker(args, recipe, "calibrate")
            if "error" in cal:
                results[recipe] = {"error": "calibration: " + cal["error"], "calibration": cal}
                _write_json(json_path, args, results, None, started)
                continue
            left = budget_s - cal["startup_s"]
            margin = 1.0 if args.replan_every else STEP_MARGIN
            num_steps = max(10, int(left / cal["s_per_step"] * margin))
            print(f"[{recipe}] plan: train.num_steps = ({budget_s:.0f} s - {cal['startup_s']:.1f} s start-up) / "
                  f"{cal['s_per_step'] * 1000:.0f} ms * {margin} = {num_steps}"
                  + (f", re-planned every {args.replan_every} updates" if args.replan_every else ""), flush=True)
            result = _run_worker(args, recipe, "train", num_steps=num_steps)
            result["calibration"] = {k: cal.get(k) for k in ("s_per_step", "startup_s", "build_s", "steps",
                                                             "img_per_s", "wall_s")}
        results[recipe] = result
        _write_json(json_path, args, results, None, started)   # partial results survive a later failure
    tables = format_tables(results, args)
    print("\n" + tables)
    print(f"\nFD: Fréchet distance in the shipped Fashion-MNIST classifier's feature space against the train split, "
          f"{args.eval_num} samples from seed {args.seed} (lower is better; biased upwards at small N: compare within "
          f"one run). Training clock: build + data + compile + updates, paused during evaluations. Anchor: "
          f"denoising-diffusion-pytorch (PyTorch, 2 threads), lr {args.torch_lr:g}.")
    _write_json(json_path, args, results, tables, started)
    print(f"wrote {json_path} ({(time.perf_counter() - started) / 60:.1f} min in all)")
    return 1 if any("error" in r for r in results.values()) else 0


def main(argv: Optional[List[str]] = None) -> int:
    return run_command(_run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
