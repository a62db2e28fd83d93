#!/usr/bin/env python
"""Test helper that msrun starts in place of train.py (``TRAIN_SCRIPT=tests/distributed_worker.py``).

It runs the real ``train.py`` code path (``ms_diffusion.cli.train.main`` with the same arguments) and,
after ``Trainer.fit`` returns, writes this rank's whole training state -- every checkpoint group
(online weights, EMA weights, optimizer moments, loss scale) plus its host RNG state and data
position -- to ``$MS_DIFFUSION_TEST_DUMP/rank_<rank>.npz``. Only the tests use it: normal runs
write files from rank 0 alone.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ms_diffusion  # noqa: E402,F401  (CPU workaround before MindSpore makes kernels)
import numpy as np  # noqa: E402

from ms_diffusion.cli.train import main  # noqa: E402
from ms_diffusion.training.trainer import Trainer  # noqa: E402

DUMP_ENV = "MS_DIFFUSION_TEST_DUMP"


def _fit_and_dump(self: Trainer, resume=None):
    summary = _original_fit(self, resume)
    folder = Path(os.environ[DUMP_ENV])
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {f"{group}.{name}": p.asnumpy() for group, params in self._state_groups().items()
              for name, p in params.items()}
    info = {"rank": self.rank, "world_size": self.world_size, "step": self.step, "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch, "rng": self.rng.bit_generator.state,
            "rng_restored": getattr(self, "rng_restored", True)}
    np.savez(folder / f"rank_{self.rank}.npz", __info__=np.array(json.dumps(info)), **arrays)
    return summary


_original_fit = Trainer.fit
if os.environ.get(DUMP_ENV):
    Trainer.fit = _fit_and_dump

if __name__ == "__main__":
    sys.exit(main())
