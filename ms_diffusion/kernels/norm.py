"""Normalisations on our CPU kernels, forward and backward; x (N, C, *) fp32.

* ``GroupNormOp(groups, eps).prim(x, gamma, beta, spec)[0]`` equals ``ops.group_norm(x, groups, gamma, beta,
  eps)``; gamma and beta (C,).
* ``RmsNormOp(modulated, silu).prim(x, g, [scale, shift,] spec)[0]`` is lucidrains' RMSNorm over channels,
  ``x / max(||x||_C, 1e-12) * g * sqrt(C)``, then optionally ``* (scale + 1) + shift`` (scale and shift
  (N, C, 1, 1): the Block's time modulation) and SiLU -- the tail of lucidrains' ``Block`` in one kernel.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

import mindspore as ms
from mindspore import Tensor, ops

from ms_diffusion.kernels import float_settings, require_library

__all__ = ["GroupNormOp", "RmsNormOp"]


class GroupNormOp:
    """The forward Custom primitive (outputs y, mean and rstd (N, C): each group's statistics repeated over
    its channels, so that no output shape depends on the settings; backward attached) and its settings
    tensor; call ``op.prim(x, gamma, beta, op.spec)[0]`` inside ``construct``."""

    def __init__(self, num_groups: int, eps: float = 1e-5, lib: Optional[str] = None):
        lib = require_library(lib)
        self.spec = float_settings([num_groups, eps])
        f32 = ms.float32

        backward = ops.Custom(f"{lib}:GroupNormBackward",
                              out_shape=lambda dy, x, mean, rstd, gamma, spec: (list(x), list(gamma), list(gamma)),
                              out_dtype=(f32, f32, f32), func_type="aot")

        def bprop(x, gamma, beta, spec, out, dout):
            dx, dgamma, dbeta = backward(dout[0], x, out[1], out[2], gamma, spec)
            return dx, dgamma, dbeta, ops.zeros_like(spec)

        self.prim = ops.Custom(f"{lib}:GroupNorm",
                               out_shape=lambda x, gamma, beta, spec: (list(x), [x[0], x[1]], [x[0], x[1]]),
                               out_dtype=(f32, f32, f32), func_type="aot", bprop=bprop)


class RmsNormOp:
    """The forward Custom primitive (outputs y and 1 / max(||x||_C, 1e-12) per position; backward attached)
    and its settings tensor. Call ``op.prim(x, g, op.spec)[0]``, or ``op.prim(x, g, scale, shift, op.spec)[0]``
    when ``modulated``."""

    def __init__(self, modulated: bool = False, silu: bool = False, lib: Optional[str] = None):
        lib = require_library(lib)
        self.spec = Tensor(np.array([int(silu)], np.int64))
        f32 = ms.float32

        def inv_shape(x):
            return [x[0], int(np.prod(x[2:]))]

        if modulated:
            backward = ops.Custom(f"{lib}:RmsNormModBackward",
                                  out_shape=lambda dy, x, inv, g, sc, sh, spec: (list(x), list(g), list(sc), list(sh)),
                                  out_dtype=(f32, f32, f32, f32), func_type="aot")

            def bprop(x, g, scale, shift, spec, out, dout):
                dx, dg, dscale, dshift = backward(dout[0], x, out[1], g, scale, shift, spec)
                return dx, dg, dscale, dshift, ops.zeros_like(spec)

            self.prim = ops.Custom(f"{lib}:RmsNormMod", out_shape=lambda x, g, sc, sh, spec: (list(x), inv_shape(x)),
                                   out_dtype=(f32, f32), func_type="aot", bprop=bprop)
        else:
            backward = ops.Custom(f"{lib}:RmsNormBackward", out_shape=lambda dy, x, inv, g, spec: (list(x), list(g)),
                                  out_dtype=(f32, f32), func_type="aot")

            def bprop(x, g, spec, out, dout):
                dx, dg = backward(dout[0], x, out[1], g, spec)
                return dx, dg, ops.zeros_like(spec)

            self.prim = ops.Custom(f"{lib}:RmsNorm", out_shape=lambda x, g, spec: (list(x), inv_shape(x)),
                                   out_dtype=(f32, f32), func_type="aot", bprop=bprop)
