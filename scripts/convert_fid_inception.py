#!/usr/bin/env python
"""Convert the FID Inception-v3 weights (PyTorch) to a MindSpore checkpoint for ``evaluate.py --features inception``.

ms_diffusion cannot download weights. Get one of these files yourself (same network, same names):

* pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (its FID_WEIGHTS_URL, a release asset of
  the mseitzer/pytorch-fid GitHub repository), or
* torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (a release asset of toshas/torch-fidelity),

both converted from TensorFlow's ``inception-2015-12-05`` graph that defines FID. Then

    python scripts/convert_fid_inception.py pt_inception-2015-12-05-6726825d.pth --out fid_inception.ckpt
    python evaluate.py --samples samples.npz --features inception --inception-weights fid_inception.ckpt

torch is needed only here, and the file is read with ``torch.load(..., weights_only=True)`` (no
code is unpickled). Every weight of the network must be matched exactly (the 1008-way ``fc`` and
BatchNorm's ``num_batches_tracked`` are dropped); the output is written atomically and records
the source file's SHA-256.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

import ms_diffusion  # noqa: F401  (CPU workaround before MindSpore makes kernels)
from ms_diffusion.cli.common import make_parser, run_command


def load_torch_state_dict(path: str) -> Dict[str, np.ndarray]:
    """A .pth state dict as numpy arrays, read with ``weights_only=True``."""
    try:
        import torch
    except ImportError:
        raise ValueError("the conversion needs PyTorch (pip install torch); ms_diffusion itself does not") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, zip errors, refusals of weights_only
        raise ValueError(f"cannot read {path} as a PyTorch state dict: {str(err).splitlines()[0]}") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(sd).__name__})")
    return {k: v.detach().cpu().numpy() for k, v in sd.items() if hasattr(v, "detach")}


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("convert_fid_inception.py", "Convert FID Inception-v3 weights (.pth) to a MindSpore checkpoint.")
    p.add_argument("weights", help="pt_inception-2015-12-05-6726825d.pth (pytorch-fid) or torch-fidelity's file")
    p.add_argument("--out", required=True, help="MindSpore checkpoint to write (.ckpt)")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return p


def _run(args: argparse.Namespace) -> int:
    from ms_diffusion.io.state import ConversionError, load_arrays_into
    from ms_diffusion.io.hashing import file_sha256
    from ms_diffusion.metrics.inception import InceptionV3FID, convert_fid_inception_state_dict, save_fid_inception

    src = Path(args.weights)
    if not src.is_file():
        raise FileNotFoundError(f"weights file {str(src)!r} does not exist")
    arrays = convert_fid_inception_state_dict(load_torch_state_dict(str(src)))
    net = InceptionV3FID()
    try:
        load_arrays_into(net, arrays)
    except ConversionError as err:
        raise ValueError(f"{src} is not the FID Inception-v3: {err}") from None
    out = save_fid_inception(net, args.out, {"source": src.name, "source_sha256": file_sha256(src)})
    print(f"wrote {len(arrays)} tensors to {out} ({out.stat().st_size / 2 ** 20:.1f} MiB)")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return run_command(_run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
