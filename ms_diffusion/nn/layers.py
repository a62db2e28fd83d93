"""Basic layers with PyTorch's conventions: explicit padding, biases on, PyTorch-style init.

MindSpore's ``nn.Conv2d`` defaults to ``pad_mode='same'`` and no bias; every convolution in the
library goes through ``conv2d`` so those defaults never leak in.
"""
from __future__ import annotations

from typing import Optional

import mindspore as ms
from mindspore import nn, ops

__all__ = ["conv2d", "dense", "Identity", "GELU", "SiLU", "to_float32", "cast_like"]


def conv2d(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
           padding: Optional[int] = None, bias: bool = True, groups: int = 1) -> nn.Conv2d:
    """A 2-D convolution on NCHW input; ``padding`` defaults to ``kernel_size // 2``."""
    if padding is None:
        padding = kernel_size // 2
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, pad_mode="pad",
                     padding=padding, has_bias=bias, group=groups)


def dense(in_features: int, out_features: int, bias: bool = True) -> nn.Dense:
    return nn.Dense(in_features, out_features, has_bias=bias)


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
