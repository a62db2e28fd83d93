"""Normalisations over the channel axis of NCHW tensors, computed in float32.

Parameters follow MindSpore's names where MindSpore has the layer (``gamma``/``beta`` for
GroupNorm) and lucidrains' ``g`` for RMSNorm / channel LayerNorm.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from ms_diffusion.kernels.norm import GroupNormOp, RmsNormOp
from ms_diffusion.nn.layers import KernelSwitch, cast_like, expand_as, to_float32

__all__ = ["RMSNorm", "ChannelLayerNorm", "GroupNorm"]


class RMSNorm(KernelSwitch, nn.Cell):
    """x / max(||x||_2 over C, 1e-12) * g * sqrt(C) (lucidrains). (B, C, H, W) -> same.

    On CPU our kernel (see ``KernelSwitch``); lucidrains' ``Block`` fuses its modulation and SiLU into it.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.scale = float(dim) ** 0.5
        self.g = Parameter(Tensor(np.ones((1, dim, 1, 1), np.float32)), name="g")
        if self._init_kernel():
            op = RmsNormOp()
            self.kernel_op, self.kernel_spec = op.prim, op.spec

    def construct(self, x):
        h = to_float32(x)
        if self.use_kernel:
            return cast_like(self.kernel_op(h, self.g, self.kernel_spec)[0], x)
        # max(||x||, 1e-12) == sqrt(max(||x||^2, 1e-24)), as torch.nn.functional.normalize
        inv = ops.rsqrt(ops.maximum((h * h).sum(axis=1, keepdims=True), 1e-24))
        return cast_like(h * expand_as(inv, h) * expand_as(self.g * self.scale, h), x)


class ChannelLayerNorm(nn.Cell):
    """(x - mean_C) / sqrt(var_C + eps) * g (+ b); biased variance. (B, C, H, W) -> same."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = False):
        super().__init__()
        self.eps = eps
        self.g = Parameter(Tensor(np.ones((1, dim, 1, 1), np.float32)), name="g")
        self.has_bias = bias
        if bias:
            self.b = Parameter(Tensor(np.zeros((1, dim, 1, 1), np.float32)), name="b")

    def construct(self, x):
        h = to_float32(x)
        mean = h.mean(axis=1, keep_dims=True)
        d = h - expand_as(mean, h)
        var = (d * d).mean(axis=1, keep_dims=True)
        out = d * expand_as(ops.rsqrt(var + self.eps), d) * expand_as(self.g, d)
        if self.has_bias:
            out = out + expand_as(self.b, out)
        return cast_like(out, x)


class GroupNorm(KernelSwitch, nn.Cell):
    """torch.nn.GroupNorm semantics on (B, C, *spatial), computed in float32; params ``gamma``/``beta``.

    On CPU our kernel (``ms_diffusion.kernels``, see ``KernelSwitch``), elsewhere MindSpore's fused
    ``ops.group_norm`` (on CPU faster than the same math written with reductions: ``python bench/ops.py``
    prints both).
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels are not divisible into {num_groups} groups")
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = float(eps)
        self.affine = affine
        self.gamma = Parameter(Tensor(np.ones((num_channels,), np.float32)), name="gamma", requires_grad=affine)
        self.beta = Parameter(Tensor(np.zeros((num_channels,), np.float32)), name="beta", requires_grad=affine)
        if self._init_kernel():
            op = GroupNormOp(num_groups, self.eps)
            self.kernel_op, self.kernel_spec = op.prim, op.spec

    def construct(self, x):
        h = to_float32(x)
        if self.use_kernel:
            return cast_like(self.kernel_op(h, self.gamma, self.beta, self.kernel_spec)[0], x)
        return cast_like(ops.group_norm(h, self.num_groups, self.gamma, self.beta, self.eps), x)
