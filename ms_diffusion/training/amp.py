"""Mixed precision for a network, in place, keeping normalisation (and so softmax/loss) in float32.

``O0`` fp32; ``O1`` convolutions and dense layers in low precision (MindSpore's white list; done
here with ``to_float`` because ``auto_mixed_precision(..., "O1")`` rewrites the class and dumps its
source into ./rewritten_network);
``O2`` the whole network in low precision except normalisation layers; ``O3`` everything low.
Parameters stay float32 (master weights); the diffusion loss is computed in float32 on the
network's output. MindSpore's ``auto_mixed_precision(..., "O2")`` wraps the network in a cell that
hides its attributes, so O2/O3 are applied here with ``Cell.to_float``.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn

from ms_diffusion.nn.norms import ChannelLayerNorm, GroupNorm, RMSNorm

__all__ = ["apply_amp", "refuse_bfloat16_on_cpu", "AMP_LEVELS", "AMP_DTYPES"]

AMP_LEVELS = ("O0", "O1", "O2", "O3")
AMP_DTYPES = {"float16": ms.float16, "bfloat16": ms.bfloat16}
_NORMS = (RMSNorm, GroupNorm, ChannelLayerNorm, nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d)
_MATMULS = (nn.Conv2d, nn.Conv2dTranspose, nn.Dense)


def refuse_bfloat16_on_cpu(dtype: str, fix: str) -> None:
    """ValueError (ending in ``fix``) when ``dtype`` is "bfloat16" and the device is the CPU."""
    if dtype == "bfloat16" and ms.get_context("device_target") == "CPU":
        raise ValueError("bfloat16 does not run on CPU: MindSpore's CPU backend has no bfloat16 kernels for Conv2D, "
                         "MatMul, BiasAdd, Sigmoid or Softmax (it falls back to float32 kernels for float16 only); "
                         + fix)


def apply_amp(network: nn.Cell, level: str = "O0", dtype: str = "float16") -> nn.Cell:
    """Set ``network``'s compute precision in place and return it."""
    if level not in AMP_LEVELS:
        raise ValueError(f"unknown amp level {level!r}; choose one of {AMP_LEVELS}")
    if dtype not in AMP_DTYPES:
        raise ValueError(f"unknown amp dtype {dtype!r}; choose one of {sorted(AMP_DTYPES)}")
    if level == "O0":
        return network
    low = AMP_DTYPES[dtype]
    refuse_bfloat16_on_cpu(dtype, "use amp_dtype float16 or amp O0 on CPU")
    if level == "O1":
        for _, cell in network.cells_and_names():
            if isinstance(cell, _MATMULS):
                cell.to_float(low)
        return network
    network.to_float(low)
    if level == "O2":
        for _, cell in network.cells_and_names():
            if isinstance(cell, _NORMS):
                cell.to_float(ms.float32)
    return network
