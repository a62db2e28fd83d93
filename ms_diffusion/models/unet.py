"""The lucidrains U-Net (denoising-diffusion-pytorch 2.x) and the MindSpore tutorial's ConvNeXt U-Net.

``Unet(block_type="resnet")`` (default) follows lucidrains' current ``Unet`` option for option.
``Unet(block_type="convnext")`` is the network of the MindSpore "Diffusion Model" tutorial:
ConvNeXt blocks, GroupNorm pre-norm attention without memory slots, strided-conv down / transposed-
conv up sampling, one skip per stage and ``init_dim = dim // 3 * 2``. ``gelu_approximate=True`` uses the
tanh GELU (the tutorial's, MindSpore's default) instead of the exact one (PyTorch's, lucidrains').
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from ms_diffusion.nn.attention import Attention, LinearAttention
from ms_diffusion.nn.blocks import ConvNextBlock, ResnetBlock
from ms_diffusion.nn.embeddings import RandomOrLearnedSinusoidalPosEmb, SinusoidalPosEmb
from ms_diffusion.nn.layers import GELU, Identity, conv2d, dense
from ms_diffusion.nn.resample import ConvDownsample, ConvTransposeUpsample, Downsample, Upsample

__all__ = ["Unet"]

BLOCK_TYPES = ("resnet", "convnext")


def _per_stage(value, n: int, name: str) -> Tuple:
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * n
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries but dim_mults has {n} stages")
    return values


class _DownStage(nn.Cell):
    def __init__(self, block1, block2, attn, downsample, skip_per_block: bool):
        super().__init__()
        self.block1, self.block2, self.attn, self.downsample = block1, block2, attn, downsample
        self.skip_per_block = skip_per_block

    def construct(self, x, emb, skips):
        x = self.block1(x, emb)
        if self.skip_per_block:
            skips = skips + (x,)
        x = self.block2(x, emb)
        x = self.attn(x) + x
        skips = skips + (x,)
        return self.downsample(x), skips


class _UpStage(nn.Cell):
    def __init__(self, block1, block2, attn, upsample, skip_per_block: bool):
        super().__init__()
        self.block1, self.block2, self.attn, self.upsample = block1, block2, attn, upsample
        self.skip_per_block = skip_per_block

    def construct(self, x, emb, skips):
        x = self.block1(ops.cat((x, skips[-1]), axis=1), emb)
        skips = skips[:-1]
        if self.skip_per_block:
            x = ops.cat((x, skips[-1]), axis=1)
            skips = skips[:-1]
        x = self.block2(x, emb)
        x = self.attn(x) + x
        return self.upsample(x), skips


class Unet(nn.Cell):
    """Noise / x0 / v predictor. ``construct(x, time, x_self_cond=None, classes=None)``.

    x: (B, channels, H, W) float, H and W divisible by ``downsample_factor``; time: (B,) int or
    float timesteps; x_self_cond: (B, channels, H, W) or None (zeros); classes: (B,) int32 in
    [0, num_classes], where ``num_classes`` itself is the "no class" token used for
    classifier-free guidance (None means all unconditional). Returns (B, out_dim, H, W).
    """

    def __init__(
        self,
        dim: int,
        init_dim: Optional[int] = None,
        out_dim: Optional[int] = None,
        dim_mults: Sequence[int] = (1, 2, 4, 8),
        channels: int = 3,
        self_condition: bool = False,
        learned_variance: bool = False,
        learned_sinusoidal_cond: bool = False,
        random_fourier_features: bool = False,
        learned_sinusoidal_dim: int = 16,
        sinusoidal_pos_emb_theta: float = 10000,
        dropout: float = 0.0,
        attn_dim_head: Union[int, Sequence[int]] = 32,
        attn_heads: Union[int, Sequence[int]] = 4,
        full_attn: Optional[Union[bool, Sequence[bool]]] = None,
        flash_attn: bool = False,
        num_classes: Optional[int] = None,
        cond_drop_prob: float = 0.5,
        block_type: str = "resnet",
        convnext_mult: int = 2,
        gelu_approximate: bool = False,
    ):
        super().__init__()
        if block_type not in BLOCK_TYPES:
            raise ValueError(f"unknown block_type {block_type!r}; choose one of {BLOCK_TYPES}")
        if dim < 2 or channels < 1 or not dim_mults:
            raise ValueError(f"Unet needs dim >= 2, channels >= 1 and at least one dim_mult "
                             f"(got dim={dim}, channels={channels}, dim_mults={dim_mults})")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer or None, got {num_classes}")
        if not 0.0 <= cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob must lie in [0, 1], got {cond_drop_prob}")
        tutorial = block_type == "convnext"

        self.channels = channels
        self.self_condition = self_condition
        self.block_type = block_type
        self.num_classes = num_classes
        self.cond_drop_prob = float(cond_drop_prob)
        input_channels = channels * (2 if self_condition else 1)

        init_dim = init_dim or (dim // 3 * 2 if tutorial else dim)
        self.init_conv = conv2d(input_channels, init_dim, 7)
        dims = [init_dim] + [dim * m for m in dim_mults]
        in_out = list(zip(dims[:-1], dims[1:]))
        num_stages = len(dim_mults)

        # time (and class) embedding
        time_dim = dim * 4
        self.random_or_learned_sinusoidal_cond = learned_sinusoidal_cond or random_fourier_features
        if self.random_or_learned_sinusoidal_cond:
            pos_emb = RandomOrLearnedSinusoidalPosEmb(learned_sinusoidal_dim, random_fourier_features)
            fourier_dim = learned_sinusoidal_dim + 1
        else:
            pos_emb = SinusoidalPosEmb(dim, theta=sinusoidal_pos_emb_theta)
            fourier_dim = dim
        self.time_mlp = nn.SequentialCell([pos_emb, dense(fourier_dim, time_dim), GELU(gelu_approximate),
                                           dense(time_dim, time_dim)])
        if num_classes is not None:
            # row num_classes is the learned "null" class of classifier-free guidance
            self.classes_emb = Parameter(Tensor(np.random.randn(num_classes + 1, dim).astype(np.float32)),
                                         name="classes_emb")
            self.classes_mlp = nn.SequentialCell([dense(dim, time_dim), GELU(gelu_approximate),
                                                  dense(time_dim, time_dim)])

        # attention per stage
        if full_attn is None:
            full_attn = (False,) * (num_stages - 1) + (True,)
        full_attn = _per_stage(full_attn, num_stages, "full_attn")
        heads = _per_stage(attn_heads, num_stages, "attn_heads")
        dim_heads = _per_stage(attn_dim_head, num_stages, "attn_dim_head")

        def block(d_in, d_out):
            if tutorial:
                return ConvNextBlock(d_in, d_out, time_emb_dim=time_dim, mult=convnext_mult,
                                     gelu_approximate=gelu_approximate)
            return ResnetBlock(d_in, d_out, time_emb_dim=time_dim, dropout=dropout)

        def attn_layer(d, full, n_heads, d_head):
            if tutorial:
                if full:
                    return Attention(d, heads=n_heads, dim_head=d_head, num_mem_kv=0, norm="group",
                                     flash=flash_attn)
                return LinearAttention(d, heads=n_heads, dim_head=d_head, num_mem_kv=0, norm="group",
                                       out_norm="layer", scale_v_by_positions=True)
            if full:
                return Attention(d, heads=n_heads, dim_head=d_head, flash=flash_attn)
            return LinearAttention(d, heads=n_heads, dim_head=d_head)

        downs = []
        for i, (d_in, d_out) in enumerate(in_out):
            last = i == num_stages - 1
            if tutorial:
                # the tutorial keeps full attention for the middle only and never widens before sampling
                downs.append(_DownStage(block(d_in, d_out), block(d_out, d_out),
                                        attn_layer(d_out, False, heads[i], dim_heads[i]),
                                        Identity() if last else ConvDownsample(d_out), skip_per_block=False))
            else:
                downs.append(_DownStage(block(d_in, d_in), block(d_in, d_in),
                                        attn_layer(d_in, full_attn[i], heads[i], dim_heads[i]),
                                        conv2d(d_in, d_out, 3) if last else Downsample(d_in, d_out),
                                        skip_per_block=True))
        self.downs = nn.CellList(downs)

        mid_dim = dims[-1]
        self.mid_block1 = block(mid_dim, mid_dim)
        self.mid_attn = attn_layer(mid_dim, True, heads[-1], dim_heads[-1])
        self.mid_block2 = block(mid_dim, mid_dim)

        ups = []
        if tutorial:
            for (d_in, d_out), n_heads, d_head in zip(reversed(in_out[1:]), reversed(heads[1:]),
                                                      reversed(dim_heads[1:])):
                ups.append(_UpStage(block(d_out * 2, d_in), block(d_in, d_in),
                                    attn_layer(d_in, False, n_heads, d_head), ConvTransposeUpsample(d_in),
                                    skip_per_block=False))
        else:
            for i, ((d_in, d_out), full, n_heads, d_head) in enumerate(
                    zip(reversed(in_out), reversed(full_attn), reversed(heads), reversed(dim_heads))):
                last = i == num_stages - 1
                ups.append(_UpStage(block(d_out + d_in, d_out), block(d_out + d_in, d_out),
                                    attn_layer(d_out, full, n_heads, d_head),
                                    conv2d(d_out, d_in, 3) if last else Upsample(d_out, d_in),
                                    skip_per_block=True))
        self.ups = nn.CellList(ups)

        self.out_dim = out_dim or channels * (2 if learned_variance else 1)
        self.learned_variance = learned_variance
        if tutorial:
            final_in = in_out[1][0] if num_stages > 1 else mid_dim
            self.final_res_block = ConvNextBlock(final_in, final_in, mult=convnext_mult,
                                                 gelu_approximate=gelu_approximate)
            self.final_conv = conv2d(final_in, self.out_dim, 1, bias=False)
        else:
            self.final_res_block = ResnetBlock(init_dim * 2, init_dim, time_emb_dim=time_dim, dropout=dropout)
            self.final_conv = conv2d(init_dim, self.out_dim, 1)
        self.num_downsamples = num_stages - 1

    @property
    def downsample_factor(self) -> int:
        return 2 ** self.num_downsamples

    def check_input_shape(self, shape: Sequence[int]) -> None:
        """Raise ValueError naming the problem if (B, C, H, W) cannot go through this network."""
        if len(shape) != 4:
            raise ValueError(f"Unet expects (batch, channels, height, width) input, got shape {tuple(shape)}")
        if shape[1] != self.channels:
            raise ValueError(f"Unet was built for {self.channels} channel(s) but the input has {shape[1]}; "
                             f"convert the images or build Unet(channels={shape[1]})")
        f = self.downsample_factor
        if shape[2] % f or shape[3] % f:
            raise ValueError(f"image size {shape[2]}x{shape[3]} is not divisible by {f} = 2^{self.num_downsamples} "
                             f"(the Unet halves the resolution {self.num_downsamples} times); resize or pad "
                             f"to a multiple of {f}, or use fewer dim_mults")

    def construct(self, x, time, x_self_cond=None, classes=None):
        self.check_input_shape(x.shape)
        if self.self_condition:
            if x_self_cond is None:
                x_self_cond = ops.zeros_like(x)
            x = ops.cat((x_self_cond, x), axis=1)

        x = self.init_conv(x)
        r = x
        emb = self.time_mlp(time)
        if self.num_classes is not None:
            if classes is None:
                classes = ops.fill(ms.int32, (x.shape[0],), self.num_classes)
            emb = emb + self.classes_mlp(ops.gather(self.classes_emb, classes.astype(ms.int32), 0))

        skips = ()
        for stage in self.downs:
            x, skips = stage(x, emb, skips)

        x = self.mid_block1(x, emb)
        x = self.mid_attn(x) + x
        x = self.mid_block2(x, emb)

        for stage in self.ups:
            x, skips = stage(x, emb, skips)

        if self.block_type == "convnext":
            return self.final_conv(self.final_res_block(x))
        x = ops.cat((x, r), axis=1)
        return self.final_conv(self.final_res_block(x, emb))
