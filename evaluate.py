#!/usr/bin/env python
"""Score generated images: ``python evaluate.py --samples samples.npz --dataset fashion-mnist`` (see --help)."""
import sys

import ms_diffusion  # noqa: F401  (CPU workaround before MindSpore makes kernels)
from ms_diffusion.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
