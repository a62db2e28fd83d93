#!/usr/bin/env python
"""Train a diffusion model: ``python train.py`` (default Fashion-MNIST config) or ``--config configs/X.yaml``."""
import signal
import sys

# Before any import starts a thread: SIGINT / SIGTERM blocked in every thread (MindSpore's runtime threads
# turn a Ctrl-C into SIGTERM, killing the run) and received by main()'s watcher, which stops the run after
# its step with a checkpoint (ms_diffusion/training/interrupt.py).
if hasattr(signal, "pthread_sigmask"):
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})

import ms_diffusion  # noqa: E402,F401  (CPU workaround before MindSpore makes kernels)
from ms_diffusion.cli.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
