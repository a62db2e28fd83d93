"""Convolutional blocks conditioned on an embedding (time, or time + class)."""
from __future__ import annotations

from typing import Optional

import mindspore as ms
from mindspore import nn, ops

from ms_diffusion.kernels.norm import RmsNormOp
from ms_diffusion.nn.layers import GELU, Identity, KernelSwitch, SiLU, conv2d, dense, expand_as, to_float32
from ms_diffusion.nn.norms import GroupNorm, RMSNorm

__all__ = ["Block", "ResnetBlock", "ConvNextBlock"]


def _dropout(p: float) -> nn.Cell:
    return nn.Dropout(p=p) if p > 0 else Identity()


class Block(KernelSwitch, nn.Cell):
    """conv3x3 -> RMSNorm -> (x * (scale + 1) + shift) -> SiLU -> dropout. (B, C, H, W) -> (B, C', H, W).

    On CPU the norm, modulation and SiLU run as one kernel of ours (see ``KernelSwitch``).
    """

    def __init__(self, dim: int, dim_out: int, dropout: float = 0.0):
        super().__init__()
        self.proj = conv2d(dim, dim_out, 3)
        self.norm = RMSNorm(dim_out)
        self.act = SiLU()
        self.dropout = _dropout(dropout)
        if self._init_kernel():
            plain, modulated = RmsNormOp(silu=True), RmsNormOp(modulated=True, silu=True)
            self.fused, self.fused_mod, self.fused_spec = plain.prim, modulated.prim, plain.spec

    def construct(self, x, scale=None, shift=None):
        x = self.proj(x)
        if self.use_kernel and x.dtype == ms.float32:
            if scale is None:
                return self.dropout(self.fused(x, self.norm.g, self.fused_spec)[0])
            return self.dropout(self.fused_mod(x, self.norm.g, to_float32(scale), to_float32(shift),
                                               self.fused_spec)[0])
        x = self.norm(x)
        if scale is not None:
            x = x * expand_as(scale + 1, x) + expand_as(shift, x)
        return self.dropout(self.act(x))


class ResnetBlock(nn.Cell):
    """lucidrains ResnetBlock: Block(scale/shift from the embedding) -> Block, plus a 1x1 skip.

    x: (B, dim, H, W), emb: (B, emb_dim) or None -> (B, dim_out, H, W).
    """

    def __init__(self, dim: int, dim_out: int, *, time_emb_dim: Optional[int] = None, dropout: float = 0.0):
        super().__init__()
        self.has_mlp = time_emb_dim is not None
        if self.has_mlp:
            self.mlp = nn.SequentialCell([SiLU(), dense(time_emb_dim, dim_out * 2)])
        self.block1 = Block(dim, dim_out, dropout=dropout)
        self.block2 = Block(dim_out, dim_out)
        self.res_conv = conv2d(dim, dim_out, 1) if dim != dim_out else Identity()

    def construct(self, x, emb=None):
        if self.has_mlp and emb is not None:
            e = self.mlp(emb)[:, :, None, None]
            scale, shift = ops.chunk(e, 2, axis=1)
            h = self.block1(x, scale, shift)
        else:
            h = self.block1(x)
        return self.block2(h) + self.res_conv(x)


class ConvNextBlock(nn.Cell):
    """The MindSpore tutorial's ConvNeXt block (Liu et al. 2022, as in the Annotated Diffusion Model).

    depthwise 7x7 (+ embedding) -> [GroupNorm(1)] -> conv3x3 (x mult) -> GELU -> GroupNorm(1)
    -> conv3x3, plus a 1x1 skip. Convolutions carry no bias, as in the tutorial. ``gelu_approximate``:
    the tutorial's GELUs are MindSpore's default tanh form; PyTorch's (and the Annotated Diffusion's) are exact.
    x: (B, dim, H, W), emb: (B, emb_dim) or None -> (B, dim_out, H, W).
    """

    def __init__(self, dim: int, dim_out: int, *, time_emb_dim: Optional[int] = None, mult: int = 2,
                 norm: bool = True, gelu_approximate: bool = False):
        super().__init__()
        self.has_mlp = time_emb_dim is not None
        if self.has_mlp:
            self.mlp = nn.SequentialCell([GELU(gelu_approximate), dense(time_emb_dim, dim)])
        self.ds_conv = conv2d(dim, dim, 7, bias=False, groups=dim)
        self.net = nn.SequentialCell([
            GroupNorm(1, dim) if norm else Identity(),
            conv2d(dim, dim_out * mult, 3, bias=False),
            GELU(gelu_approximate),
            GroupNorm(1, dim_out * mult),
            conv2d(dim_out * mult, dim_out, 3, bias=False),
        ])
        self.res_conv = conv2d(dim, dim_out, 1, bias=False) if dim != dim_out else Identity()

    def construct(self, x, emb=None):
        h = self.ds_conv(x)
        if self.has_mlp and emb is not None:
            h = h + expand_as(self.mlp(emb)[:, :, None, None], h)
        return self.net(h) + self.res_conv(x)
