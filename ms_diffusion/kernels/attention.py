"""Linear attention's core on our CPU kernel, forward and backward.

``LinearAttentionOp(heads, scale, v_by_positions, memory).prim(qkv, [mem,] spec)`` is the part of lucidrains'
(and the MindSpore tutorial's) ``LinearAttention`` between the qkv projection and the output projection.
With q, k, v the thirds of ``qkv`` (B, 3 * heads * D, h, w) seen as (B, heads, D, N), N = h * w:

    k' = softmax([mem_k | k], positions axis)       (B, heads, D, M + N)
    context = k' @ [mem_v | v]^T  (/ N when v_by_positions)          (B, heads, D, D)
    out = context^T @ (softmax(q, feature axis) * scale)             (B, heads, D, N) -> (B, heads * D, h, w)

``mem`` (2, heads, D, M): learned memory keys and values (absent when ``memory`` is False).
"""
from __future__ import annotations

from typing import Optional

import mindspore as ms
from mindspore import ops

from ms_diffusion.kernels import float_settings, require_library

__all__ = ["LinearAttentionOp"]


class LinearAttentionOp:
    """The forward Custom primitive (backward attached) and its settings tensor; call
    ``op.prim(qkv, mem, op.spec)`` (``op.prim(qkv, op.spec)`` without memory) inside ``construct``."""

    def __init__(self, heads: int, scale: float, v_by_positions: bool = False, memory: bool = True,
                 lib: Optional[str] = None):
        lib = require_library(lib)
        self.spec = float_settings([heads, scale, float(v_by_positions)])
        f32 = ms.float32

        def out_shape(qkv, *rest):
            return [qkv[0], qkv[1] // 3, *qkv[2:]]

        if memory:
            backward = ops.Custom(f"{lib}:LinearAttentionMemBackward",
                                  out_shape=lambda dout, qkv, mem, spec: (list(qkv), list(mem)),
                                  out_dtype=(f32, f32), func_type="aot")

            def bprop(qkv, mem, spec, out, dout):
                dqkv, dmem = backward(dout, qkv, mem, spec)
                return dqkv, dmem, ops.zeros_like(spec)

            self.prim = ops.Custom(f"{lib}:LinearAttentionMem", out_shape=out_shape, out_dtype=f32,
                                   func_type="aot", bprop=bprop)
        else:
            backward = ops.Custom(f"{lib}:LinearAttentionBackward", out_shape=lambda dout, qkv, spec: list(qkv),
                                  out_dtype=f32, func_type="aot")

            def bprop(qkv, spec, out, dout):
                return backward(dout, qkv, spec), ops.zeros_like(spec)

            self.prim = ops.Custom(f"{lib}:LinearAttention", out_shape=out_shape, out_dtype=f32, func_type="aot",
                                   bprop=bprop)
