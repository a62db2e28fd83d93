"""Down/upsampling by 2 in the anchors' forms. All map (B, C, H, W) -> (B, C', H/2 or 2H, W/2 or 2W)."""
from __future__ import annotations

from typing import Optional

from mindspore import nn, ops

from ms_diffusion.nn.layers import conv2d

__all__ = ["pixel_unshuffle2", "upsample_nearest2", "Downsample", "Upsample", "ConvDownsample",
           "ConvTransposeUpsample"]


def pixel_unshuffle2(x):
    """'b c (h 2) (w 2) -> b (c 2 2) h w' (einops order: channel, then row, then column offset)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def upsample_nearest2(x):
    """Nearest-neighbour x2 upsampling by broadcasting (same values as interpolate(mode='nearest'))."""
    b, c, h, w = x.shape
    x = ops.broadcast_to(x[:, :, :, None, :, None], (b, c, h, 2, w, 2))
    return x.reshape(b, c, h * 2, w * 2)


class Downsample(nn.Cell):
    """lucidrains: pixel-unshuffle (space to depth) then a 1x1 convolution."""

    def __init__(self, dim: int, dim_out: Optional[int] = None):
        super().__init__()
        self.conv = conv2d(dim * 4, dim_out or dim, 1)

    def construct(self, x):
        return self.conv(pixel_unshuffle2(x))


class Upsample(nn.Cell):
    """lucidrains / ldm: nearest x2 then a 3x3 convolution."""

    def __init__(self, dim: int, dim_out: Optional[int] = None):
        super().__init__()
        self.conv = conv2d(dim, dim_out or dim, 3)

    def construct(self, x):
        return self.conv(upsample_nearest2(x))


class ConvDownsample(nn.Cell):
    """A strided convolution (the MindSpore tutorial: 4x4, stride 2, padding 1, no bias)."""

    def __init__(self, dim: int, dim_out: Optional[int] = None, kernel_size: int = 4, padding: int = 1,
                 bias: bool = False):
        super().__init__()
        self.conv = conv2d(dim, dim_out or dim, kernel_size, stride=2, padding=padding, bias=bias)

    def construct(self, x):
        return self.conv(x)


class ConvTransposeUpsample(nn.Cell):
    """A transposed convolution (the MindSpore tutorial: 4x4, stride 2, padding 1, no bias)."""

    def __init__(self, dim: int, dim_out: Optional[int] = None, bias: bool = False):
        super().__init__()
        self.conv = nn.Conv2dTranspose(dim, dim_out or dim, 4, stride=2, pad_mode="pad", padding=1,
                                       has_bias=bias)

    def construct(self, x):
        return self.conv(x)
