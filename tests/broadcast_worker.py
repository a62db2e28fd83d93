#!/usr/bin/env python
"""Test helper (tests/test_graph_broadcasts.py): compiles the forward graph of each of our networks with
MindSpore's IR dumps on (``MS_DEV_SAVE_GRAPHS``, set by the caller) and writes which kernel graph holds
which network to ``OUT/graphs.json``.

    MS_DEV_SAVE_GRAPHS=1 MS_DEV_SAVE_GRAPHS_PATH=OUT/ir python tests/broadcast_worker.py OUT
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ms_diffusion  # noqa: E402,F401  (CPU workaround before MindSpore makes kernels)
import mindspore as ms  # noqa: E402
import numpy as np  # noqa: E402

RNG = np.random.default_rng(0)


def _t(*shape):
    return ms.Tensor(RNG.standard_normal(shape).astype(np.float32))


def networks():
    """(name, cell, inputs, train mode): every network whose layers do elementwise arithmetic on feature maps."""
    from ms_diffusion.losses.lpips import LPIPS
    from ms_diffusion.models import AutoencoderKL, UNetModel, Unet
    from ms_diffusion.models.autoencoder import ResnetBlock
    from ms_diffusion.models.discriminator import NLayerDiscriminator
    from ms_diffusion.nn.attention import set_attention_slicing
    from ms_diffusion.nn.norms import ChannelLayerNorm, RMSNorm

    ldm = dict(image_size=8, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=1,
               attention_resolutions=(1,), channel_mult=(1,), num_heads=2, use_spatial_transformer=True,
               context_dim=16)   # one level: every kind of block, the least to compile
    sliced = UNetModel(**ldm, use_scale_shift_norm=True)
    set_attention_slicing(sliced, 16)              # 64 queries at the first level: four slices
    vae = AutoencoderKL(dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32,
                             ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0), 4)
    return [
        ("positive control: x + e", None, (_t(2, 32, 8, 8), _t(2, 32, 1, 1)), False),
        ("ldm UNetModel, time embedding added", UNetModel(**ldm), (_t(2, 4, 8, 8), ms.Tensor([3, 7], ms.int32),
                                                                  _t(2, 5, 16)), False),
        ("ldm UNetModel, scale-shift norm, attention slices", sliced,
         (_t(2, 4, 8, 8), ms.Tensor([3, 7], ms.int32), _t(2, 5, 16)), False),
        ("AutoencoderKL", vae, (_t(2, 3, 16, 16),), False),
        ("VAE ResnetBlock with a time embedding", ResnetBlock(32, 32, temb_channels=16), (_t(2, 32, 8, 8),
                                                                                          _t(2, 16)), False),
        ("lucidrains Unet (resnet)", Unet(dim=16, dim_mults=(1,), channels=1),
         (_t(2, 1, 16, 16), ms.Tensor([3.0, 7.0], ms.float32)), False),
        ("tutorial Unet (convnext)", Unet(dim=16, dim_mults=(1,), channels=1, block_type="convnext"),
         (_t(2, 1, 16, 16), ms.Tensor([3.0, 7.0], ms.float32)), False),
        ("RMSNorm", RMSNorm(32), (_t(2, 32, 8, 8),), False),
        ("ChannelLayerNorm with bias", ChannelLayerNorm(32, bias=True), (_t(2, 32, 8, 8),), False),
        ("LPIPS", LPIPS(), (_t(2, 3, 32, 32), _t(2, 3, 32, 32)), False),
        ("NLayerDiscriminator with ActNorm, training", NLayerDiscriminator(3, 16, 2, use_actnorm=True),
         (_t(2, 3, 32, 32),), True),
    ]


def main(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    ms.set_context(mode=ms.GRAPH_MODE)
    names = []
    for name, cell, inputs, train in networks():
        if cell is None:
            def fn(x, e):
                return x + e
        else:
            cell.set_train(train)

            def fn(*args, cell=cell):
                return cell(*args)
        ms.jit(fn)(*inputs)
        names.append(name)
    (out / "graphs.json").write_text(json.dumps(names))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
