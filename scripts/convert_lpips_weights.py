#!/usr/bin/env python
"""Convert LPIPS (VGG16) weights from PyTorch files to a MindSpore checkpoint for ms_diffusion.

LPIPS needs two sets of weights, neither downloadable by ms_diffusion:

* the 1x1 "lin" layers: the ``lpips`` package ships them as ``lpips/weights/v0.1/vgg.pth``
  (``pip install --no-deps lpips``; found automatically when installed), or taming's
  ``vgg.pth`` ("vgg_lpips");
* the VGG16 ImageNet trunk: torchvision's ``vgg16-397923af.pth``
  (https://download.pytorch.org/models/vgg16-397923af.pth), or any full ``lpips.LPIPS(net="vgg")``
  state dict that already contains ``net.slice*`` weights.

    python scripts/convert_lpips_weights.py --vgg vgg16-397923af.pth --out lpips_vgg.ckpt
    python scripts/convert_lpips_weights.py --lin path/to/vgg.pth --vgg vgg16-397923af.pth --out lpips_vgg.ckpt

Then ``LPIPSWithDiscriminator(..., lpips_ckpt="lpips_vgg.ckpt")`` (or ``LPIPS.from_checkpoint``).
torch is used only here, with ``torch.load(..., weights_only=True)`` (no unpickling of code).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from typing import Dict, Optional

import numpy as np


def installed_lpips_lin_weights() -> Optional[str]:
    """Path of the installed ``lpips`` package's v0.1 VGG lin weights, found without importing lpips."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "weights", "v0.1", "vgg.pth")
    return path if os.path.isfile(path) else None


def load_torch_state_dict(path: str) -> Dict[str, np.ndarray]:
    import torch  # only needed for conversion

    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    return {k: v.detach().cpu().numpy() for k, v in sd.items() if hasattr(v, "detach")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lin", help="lpips lin-layer weights (.pth); default: the installed lpips package's")
    parser.add_argument("--vgg", required=True, help="torchvision VGG16 weights or a full LPIPS state dict (.pth)")
    parser.add_argument("--out", required=True, help="output MindSpore checkpoint (.ckpt or .safetensors)")
    args = parser.parse_args(argv)

    lin = args.lin or installed_lpips_lin_weights()
    if lin is None:
        parser.error("no --lin given and the lpips package is not installed (pip install --no-deps lpips)")
    for path in (lin, args.vgg):
        if not os.path.isfile(path):
            parser.error(f"file not found: {path}")

    import mindspore as ms

    from ms_diffusion.losses.lpips import LPIPS, convert_lpips_state_dict

    arrays = convert_lpips_state_dict(load_torch_state_dict(args.vgg), load_torch_state_dict(lin))
    model = LPIPS()
    try:
        model.load_arrays(arrays)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    fmt = "safetensors" if args.out.endswith(".safetensors") else "ckpt"
    ms.save_checkpoint(model, args.out, format=fmt)
    print(f"wrote {len(arrays)} LPIPS tensors to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
