#!/usr/bin/env python
"""Train a diffusion model: ``python train.py`` (default Fashion-MNIST config) or ``--config configs/X.yaml``."""
import sys

import ms_diffusion  # noqa: F401  (CPU workaround before MindSpore makes kernels)
from ms_diffusion.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
