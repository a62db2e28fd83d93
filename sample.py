#!/usr/bin/env python
"""Sample from a trained model: ``python sample.py --ckpt runs/NAME`` (see --help)."""
import sys

import ms_diffusion  # noqa: F401  (CPU workaround before MindSpore makes kernels)
from ms_diffusion.cli.sample import main

if __name__ == "__main__":
    sys.exit(main())
