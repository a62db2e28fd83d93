"""Axis swaps on our CPU kernel: ``SwapAxesOp().prim(x)`` equals ``x.swapaxes(1, 2)`` for a 4-d float32 tensor
(A, N, M, D) -> (A, M, N, D), and is its own backward.

MindSpore's Transpose keeps 8 bytes per element for as long as a compiled graph lives (docs/cpu_kernels.md):
about 1.4 GB of Stable Diffusion 1.5's UNet step at 512 x 512, in its attention head splits and its
transformer blocks' channel-last layout. This kernel keeps nothing.
"""
from __future__ import annotations

from typing import Optional

import mindspore as ms
from mindspore import ops

from ms_diffusion.kernels import require_library

__all__ = ["SwapAxesOp"]


class SwapAxesOp:
    """The Custom primitive ``prim(x)`` (backward attached: the same swap of the gradient)."""

    def __init__(self, lib: Optional[str] = None):
        lib = require_library(lib)

        def bprop(x, out, dout):
            return (self.prim(dout),)

        self.prim = ops.Custom(f"{lib}:SwapAxes12", out_shape=lambda x: [x[0], x[2], x[1], x[3]],
                               out_dtype=ms.float32, func_type="aot", bprop=bprop)
