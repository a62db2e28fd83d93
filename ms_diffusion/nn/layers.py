"""Basic layers with PyTorch's conventions: explicit padding, biases on, PyTorch-style init.

MindSpore's ``nn.Conv2d`` defaults to ``pad_mode='same'`` and no bias; every convolution in the
library goes through ``conv2d`` so those defaults never leak in.
"""
from __future__ import annotations

from typing import Optional

import mindspore as ms
from mindspore import nn, ops

from ms_diffusion import kernels
from ms_diffusion.kernels.conv import Conv2dOp
from ms_diffusion.kernels.conv import available as conv_kernel_available
from ms_diffusion.kernels.layout import SwapAxesOp

__all__ = ["KernelSwitch", "Conv2d", "conv2d", "dense", "Identity", "GELU", "SiLU", "to_float32", "cast_like", "expand_as", "SwapAxes12"]


class KernelSwitch:
    """Mixin of the layers that have a CPU kernel of ours (``ms_diffusion.kernels``).

    Whether a layer uses it is decided when the layer is built (``kernels.enabled()``: CPU device,
    x86-64, library built, ``MS_DIFFUSION_CPU_KERNELS`` not 0). The kernels are fp32:
    ``to_float(float16 / bfloat16)`` -- on the layer or on a parent -- makes MindSpore cast inside its
    built-in op, so the layer switches back to it; ``to_float(float32)`` switches the kernel on again.
    """

    def _init_kernel(self) -> bool:
        self.kernel_ready = kernels.enabled()
        self.use_kernel = self.kernel_ready
        return self.kernel_ready

    def add_flags(self, **flags):
        super().add_flags(**flags)
        if flags.get("fp16") or flags.get("bf16"):
            self.use_kernel = False
        elif flags.get("fp32"):
            self.use_kernel = getattr(self, "kernel_ready", False)
        return self


class Conv2d(KernelSwitch, nn.Conv2d):
    """``nn.Conv2d`` (same parameters, names and initialisation) on our oneDNN kernel on CPU
    (see ``KernelSwitch``). (B, C, H, W) -> (B, O, H', W')."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, has_bias: bool = True, group: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, pad_mode="pad",
                         padding=padding, has_bias=has_bias, group=group)
        if self._init_kernel() and not conv_kernel_available(stride, padding, 1, group):
            self.kernel_ready = self.use_kernel = False      # more distinct settings than the library has names
        if self.kernel_ready:
            op = Conv2dOp(stride=stride, padding=padding, groups=group, has_bias=has_bias)
            self.kernel_op, self.kernel_spec = op.prim, op.spec

    def construct(self, x):
        if self.use_kernel and x.dtype == ms.float32 and self.weight.dtype == ms.float32:
            if self.has_bias:
                return self.kernel_op(x, self.weight, self.bias, self.kernel_spec)
            return self.kernel_op(x, self.weight, self.kernel_spec)
        output = self.conv2d(x, self.weight)
        if self.has_bias:
            output = self.bias_add(output, self.bias)
        return output


def conv2d(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
           padding: Optional[int] = None, bias: bool = True, groups: int = 1) -> nn.Conv2d:
    """A 2-D convolution on NCHW input; ``padding`` defaults to ``kernel_size // 2``."""
    if padding is None:
        padding = kernel_size // 2
    return Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, has_bias=bias,
                  group=groups)


def dense(in_features: int, out_features: int, bias: bool = True) -> nn.Dense:
    return nn.Dense(in_features, out_features, has_bias=bias)


class SwapAxes12(KernelSwitch, nn.Cell):
    """``x.swapaxes(1, 2)`` of a 3-d (A, N, M) or 4-d (A, N, M, D) tensor -> (A, M, N[, D]).

    On CPU in float32 our kernel (``kernels.layout``): MindSpore's Transpose keeps 8 bytes per element while a
    compiled graph lives. Elsewhere, and in half precision, MindSpore's swapaxes.
    """

    def __init__(self):
        super().__init__()
        if self._init_kernel():
            self.kernel_op = SwapAxesOp().prim

    def construct(self, x):
        if self.use_kernel and x.dtype == ms.float32:
            if x.ndim == 3:
                a, n, m = x.shape
                return self.kernel_op(x.reshape(a, n, m, 1)).reshape(a, m, n)
            return self.kernel_op(x)
        return x.swapaxes(1, 2)


class Identity(nn.Cell):
    """Returns its first input; extra arguments (a time embedding) are ignored."""

    def construct(self, x, *args):
        return x


class GELU(nn.Cell):
    """Exact (erf) GELU, PyTorch's default; ``approximate=True`` is the tanh form, MindSpore ``nn.GELU``'s default."""

    def __init__(self, approximate: bool = False):
        super().__init__()
        self.act = nn.GELU(approximate=approximate)

    def construct(self, x):
        return self.act(x)


class SiLU(nn.Cell):
    def construct(self, x):
        return x * ops.sigmoid(x)


def to_float32(x: ms.Tensor) -> ms.Tensor:
    return x.astype(ms.float32) if x.dtype != ms.float32 else x


def cast_like(x: ms.Tensor, ref: ms.Tensor) -> ms.Tensor:
    return x.astype(ref.dtype) if x.dtype != ref.dtype else x


def expand_as(small: ms.Tensor, like: ms.Tensor) -> ms.Tensor:
    """``small`` (broadcastable to ``like``, e.g. (B, C, 1, 1) against (B, C, H, W)) as a tensor of ``like``'s shape.

    Give it to the large tensor's elementwise arithmetic instead of ``small`` itself. MindSpore 2.10's CPU kernels
    for broadcasting Add / Sub / Mul (any operand that is neither full-shaped nor a single element) keep about 16
    bytes per output element, for each such op of a compiled graph, for as long as the graph lives, and run 1.3-2.6x
    slower than ``broadcast_to`` followed by a same-shape op, which keeps nothing (16 adds of (2, 320, 128, 128) +
    (2, 320, 1, 1): 2.6 GB held, 155 ms, against 0.14 GB and 115 ms). The gradient is the same reduction either way.
    """
    return ops.broadcast_to(small, like.shape)
