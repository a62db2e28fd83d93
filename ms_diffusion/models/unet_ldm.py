"""ldm's ``UNetModel`` (openaimodel.py): ResBlocks, self-attention or SpatialTransformer, class labels.

``UNetModel(...)`` takes ldm's constructor options (``dims=2`` only; ``use_checkpoint`` /
``use_fp16`` are accepted and ignored: use MindSpore's recompute / amp instead). The parameter
tree is ldm's: ``time_embed.{0,2}``, ``label_emb``, ``input_blocks.N.M.*``, ``middle_block.M.*``,
``output_blocks.N.M.*``, ``out.{0,2}``. Differences a checkpoint converter must apply:

* GroupNorm / LayerNorm ``weight``/``bias`` are ``gamma``/``beta``; ``label_emb.weight`` is
  ``label_emb.embedding_table``.
* AttentionBlock's ``qkv`` and ``proj_out`` are 1x1 Conv2d here (weights (O, I, 1, 1)); ldm uses
  Conv1d (O, I, 1): add / drop the trailing axis.
* ldm builds the final conv as ``conv_nd(model_channels, ...)`` although its input has
  ``model_channels * channel_mult[0]`` channels (they agree whenever ``channel_mult[0] == 1``,
  true of every released config); we use the actual channel count.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import mindspore as ms
from mindspore import nn, ops

from ms_diffusion.nn.attention import attention, flash_attention_available
from ms_diffusion.nn.embeddings import SinusoidalPosEmb
from ms_diffusion.nn.layers import Identity, SiLU, conv2d, dense, expand_as
from ms_diffusion.nn.norms import GroupNorm
from ms_diffusion.nn.resample import Upsample as ConvUpsample
from ms_diffusion.nn.resample import upsample_nearest2
from ms_diffusion.nn.transformer import SpatialTransformer, zero_init

__all__ = ["UNetModel", "ResBlock", "AttentionBlock", "Downsample", "NearestUpsample", "make_upsample",
           "TimestepEmbedSequential"]


def _dropout(p: float) -> nn.Cell:
    return nn.Dropout(p=p) if p > 0 else Identity()


class NearestUpsample(nn.Cell):
    """Nearest-neighbour x2, no parameters. (B, C, H, W) -> (B, C, 2H, 2W)."""

    def construct(self, x):
        return upsample_nearest2(x)


def make_upsample(channels: int, use_conv: bool, out_channels: Optional[int] = None) -> nn.Cell:
    """ldm's Upsample: nearest x2, then a 3x3 conv (param ``conv``) when ``use_conv``."""
    if use_conv:
        return ConvUpsample(channels, out_channels or channels)
    if out_channels not in (None, channels):
        raise ValueError("an upsample without convolution cannot change the channel count")
    return NearestUpsample()



class Downsample(nn.Cell):
    """x1/2: 3x3 stride-2 conv, padding 1 (param ``op``), or 2x2 average pooling. (B, C, H, W) -> (B, C', H/2, W/2)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: Optional[int] = None):
        super().__init__()
        out_channels = out_channels or channels
        self.use_conv = bool(use_conv)
        if self.use_conv:
            self.op = conv2d(channels, out_channels, 3, stride=2, padding=1)
        elif out_channels != channels:
            raise ValueError("an average-pool downsample cannot change the channel count")

    def construct(self, x):
        if self.use_conv:
            return self.op(x)
        return ops.avg_pool2d(x, kernel_size=2, stride=2)


class ResBlock(nn.Cell):
    """ldm ResBlock: GroupNorm-SiLU-conv, + time embedding (added, or FiLM scale/shift), GroupNorm-SiLU-dropout-conv.

    x (B, C, H, W), emb (B, emb_channels) -> (B, out_channels, H', W') with H' = H, 2H (up) or H/2 (down).
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float = 0.0, out_channels: Optional[int] = None,
                 use_conv: bool = False, use_scale_shift_norm: bool = False, up: bool = False, down: bool = False,
                 num_groups: int = 32):
        super().__init__()
        out_channels = out_channels or channels
        self.out_channels = out_channels
        self.use_scale_shift_norm = bool(use_scale_shift_norm)
        self.in_layers = nn.SequentialCell([GroupNorm(num_groups, channels), SiLU(),
                                            conv2d(channels, out_channels, 3)])
        self.updown = bool(up or down)
        if up:
            self.h_upd, self.x_upd = NearestUpsample(), NearestUpsample()
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        self.emb_layers = nn.SequentialCell([SiLU(), dense(emb_channels, 2 * out_channels if use_scale_shift_norm
                                                           else out_channels)])
        self.out_layers = nn.SequentialCell([GroupNorm(num_groups, out_channels), SiLU(), _dropout(dropout),
                                             zero_init(conv2d(out_channels, out_channels, 3))])
        if out_channels == channels:
            self.skip_connection = Identity()
        elif use_conv:
            self.skip_connection = conv2d(channels, out_channels, 3)
        else:
            self.skip_connection = conv2d(channels, out_channels, 1)

    def construct(self, x, emb):
        if self.updown:
            h = self.in_layers[1](self.in_layers[0](x))
            h = self.in_layers[2](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).astype(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = ops.chunk(emb_out, 2, axis=1)
            h = self.out_layers[0](h)
            h = h * expand_as(1.0 + scale, h) + expand_as(shift, h)
            h = self.out_layers[3](self.out_layers[2](self.out_layers[1](h)))
        else:
            h = self.out_layers(h + expand_as(emb_out, h))
        return self.skip_connection(x) + h


class AttentionBlock(nn.Cell):
    """Self-attention over the pixels with a residual. (B, C, H, W) -> (B, C, H, W).

    ``num_head_channels=-1`` uses ``num_heads`` heads, else C // num_head_channels heads. The
    fused qkv projection is split heads-first (ldm ``QKVAttentionLegacy``, default) or
    q/k/v-first (``use_new_attention_order``, ``QKVAttention``).
    """

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 use_new_attention_order: bool = False, num_groups: int = 32, flash: bool = False):
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"attention channels {channels} are not divisible by num_head_channels "
                                 f"{num_head_channels}")
            self.num_heads = channels // num_head_channels
        if self.num_heads < 1 or channels % self.num_heads:
            raise ValueError(f"attention channels {channels} cannot be split into {self.num_heads} heads")
        self.head_dim = channels // self.num_heads
        self.new_order = bool(use_new_attention_order)
        self.norm = GroupNorm(num_groups, channels)
        self.qkv = conv2d(channels, channels * 3, 1)
        self.proj_out = zero_init(conv2d(channels, channels, 1))
        self.use_flash = bool(flash) and flash_attention_available(self.head_dim)
        self.attention_slice = 0

    def construct(self, x):
        b, c, h, w = x.shape
        n = h * w
        qkv = self.qkv(self.norm(x))
        # ops.chunk rather than strided slicing (several times faster on MindSpore CPU)
        if self.new_order:   # [q | k | v], each split into heads
            q, k, v = ops.chunk(qkv.reshape(b, 3 * c, n), 3, axis=1)
        else:                # heads, each [q | k | v]
            q, k, v = ops.chunk(qkv.reshape(b * self.num_heads, 3 * self.head_dim, n), 3, axis=1)
        shape = (b, self.num_heads, self.head_dim, n)
        out = attention(q.reshape(shape), k.reshape(shape), v.reshape(shape), self.head_dim ** -0.5, self.use_flash,
                        channels_first=True, slice_size=self.attention_slice)  # (b, heads, d, n): no transposes
        return x + self.proj_out(out.reshape(b, c, h, w))


_RES, _XFORMER, _PLAIN = "res", "xformer", "plain"


class TimestepEmbedSequential(nn.SequentialCell):
    """Layers applied in order; ResBlocks get the time embedding, SpatialTransformers the context.

    Children are named ``0, 1, ...`` as in ldm. x (B, C, H, W) -> (B, C', H', W').
    """

    def __init__(self, layers: Sequence[nn.Cell]):
        super().__init__(list(layers))
        kinds = []
        for layer in layers:
            if isinstance(layer, ResBlock):
                kinds.append(_RES)
            elif isinstance(layer, SpatialTransformer):
                kinds.append(_XFORMER)
            else:
                kinds.append(_PLAIN)
        self.kinds = tuple(kinds)

    def construct(self, x, emb, context=None):
        for i in range(len(self.kinds)):
            kind = self.kinds[i]
            if kind == _RES:
                x = self.cell_list[i](x, emb)
            elif kind == _XFORMER:
                x = self.cell_list[i](x, context)
            else:
                x = self.cell_list[i](x)
        return x


def _heads(ch: int, num_heads: int, num_head_channels: int, legacy: bool, use_spatial_transformer: bool
           ) -> Tuple[int, int]:
    """ldm's (num_heads, dim_head) rule for a block with ``ch`` channels."""
    if num_head_channels == -1:
        dim_head = ch // num_heads
    else:
        num_heads = ch // num_head_channels
        dim_head = num_head_channels
    if legacy:
        dim_head = ch // num_heads if use_spatial_transformer else num_head_channels
    return num_heads, dim_head


class UNetModel(nn.Cell):
    """ldm U-Net: ``construct(x, timesteps, context=None, y=None)``.

    x: (B, in_channels, H, W) with H, W divisible by 2^(len(channel_mult) - 1); timesteps: (B,)
    int or float; context: (B, M, context_dim) for the SpatialTransformers (None: they attend to
    the pixels themselves); y: (B,) int class labels in [0, num_classes) iff ``num_classes`` is set.
    Returns (B, out_channels, H, W). Time embedding: ldm's cos-sin sinusoid of width
    ``model_channels`` (``SinusoidalPosEmb(flip_sin_to_cos=True, downscale_freq_shift=0)``).
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: Optional[int] = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: int = 1,
        context_dim: Optional[int] = None,
        n_embed: Optional[int] = None,
        legacy: bool = True,
        use_linear_in_transformer: bool = False,
        norm_num_groups: int = 32,
        flash_attn: bool = False,
    ):
        super().__init__()
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}  # the arguments
        if dims != 2:
            raise ValueError(f"UNetModel supports dims=2 (images) only, got dims={dims}")
        if n_embed is not None:
            raise ValueError("n_embed (predicting VQ codebook ids) is not supported")
        if use_spatial_transformer and context_dim is None:
            raise ValueError("use_spatial_transformer=True needs context_dim (the width of the conditioning tokens)")
        if context_dim is not None and not use_spatial_transformer:
            raise ValueError("context_dim is set but use_spatial_transformer is False; enable the spatial "
                             "transformer for cross-attention conditioning")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("set either num_heads or num_head_channels")
        if num_res_blocks < 1 or not channel_mult:
            raise ValueError("UNetModel needs num_res_blocks >= 1 and at least one channel_mult")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer or None, got {num_classes}")
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.channel_mult = tuple(channel_mult)
        self.num_classes = num_classes
        self.context_dim = context_dim
        self.use_spatial_transformer = bool(use_spatial_transformer)
        self.num_downsamples = len(self.channel_mult) - 1

        time_embed_dim = model_channels * 4
        self.time_proj = SinusoidalPosEmb(model_channels, downscale_freq_shift=0.0, flip_sin_to_cos=True)
        self.time_embed = nn.SequentialCell([dense(model_channels, time_embed_dim), SiLU(),
                                             dense(time_embed_dim, time_embed_dim)])
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        def res(ch_in, ch_out, up=False, down=False):
            return ResBlock(ch_in, time_embed_dim, dropout, out_channels=ch_out,
                            use_scale_shift_norm=use_scale_shift_norm, up=up, down=down, num_groups=norm_num_groups)

        def attn(ch, heads, dim_head, heads_for_attention_block):
            if use_spatial_transformer:
                return SpatialTransformer(ch, heads, dim_head, depth=transformer_depth, context_dim=context_dim,
                                          use_linear=use_linear_in_transformer, num_groups=norm_num_groups,
                                          flash=flash_attn)
            return AttentionBlock(ch, num_heads=heads_for_attention_block, num_head_channels=dim_head,
                                  use_new_attention_order=use_new_attention_order, num_groups=norm_num_groups,
                                  flash=flash_attn)

        input_blocks = [TimestepEmbedSequential([conv2d(in_channels, model_channels, 3)])]
        input_block_chans = [model_channels]
        ch = model_channels
        ds = 1
        heads = num_heads
        for level, mult in enumerate(self.channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in self.attention_resolutions:
                    heads, dim_head = _heads(ch, heads, num_head_channels, legacy, use_spatial_transformer)
                    layers.append(attn(ch, heads, dim_head, heads))
                input_blocks.append(TimestepEmbedSequential(layers))
                input_block_chans.append(ch)
            if level != len(self.channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, ch)
                input_blocks.append(TimestepEmbedSequential([down]))
                input_block_chans.append(ch)
                ds *= 2
        self.input_blocks = nn.CellList(input_blocks)

        heads, dim_head = _heads(ch, heads, num_head_channels, legacy, use_spatial_transformer)
        self.middle_block = TimestepEmbedSequential([res(ch, ch), attn(ch, heads, dim_head, heads), res(ch, ch)])

        output_blocks = []
        for level, mult in list(enumerate(self.channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                ich = input_block_chans.pop()
                layers = [res(ch + ich, model_channels * mult)]
                ch = model_channels * mult
                if ds in self.attention_resolutions:
                    heads, dim_head = _heads(ch, heads, num_head_channels, legacy, use_spatial_transformer)
                    layers.append(attn(ch, heads, dim_head, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown else make_upsample(ch, conv_resample, ch))
                    ds //= 2
                output_blocks.append(TimestepEmbedSequential(layers))
        self.output_blocks = nn.CellList(output_blocks)

        self.out = nn.SequentialCell([GroupNorm(norm_num_groups, ch), SiLU(),
                                      zero_init(conv2d(ch, out_channels, 3))])

    @property
    def downsample_factor(self) -> int:
        return 2 ** self.num_downsamples

    def check_input_shape(self, shape: Sequence[int]) -> None:
        """Raise ValueError naming the problem if (B, C, H, W) cannot go through this network."""
        if len(shape) != 4:
            raise ValueError(f"UNetModel expects (batch, channels, height, width) input, got {tuple(shape)}")
        if shape[1] != self.in_channels:
            raise ValueError(f"UNetModel was built for {self.in_channels} input channel(s), got {shape[1]}")
        f = self.downsample_factor
        if shape[2] % f or shape[3] % f:
            raise ValueError(f"input size {shape[2]}x{shape[3]} is not divisible by {f} (the U-Net halves it "
                             f"{self.num_downsamples} times); pad or resize, or use fewer channel_mult levels")

    def construct(self, x, timesteps, context=None, y=None):
        if (y is None) != (self.num_classes is None):
            raise ValueError("UNetModel: pass class labels y if and only if the model was built with num_classes")
        if self.use_spatial_transformer and context is not None and context.shape[-1] != self.context_dim:
            raise ValueError(f"context has width {context.shape[-1]} but the model was built with "
                             f"context_dim={self.context_dim}")
        emb = self.time_embed(self.time_proj(timesteps))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y.astype(ms.int32))
        hs = ()
        h = x
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs = hs + (h,)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = module(ops.cat((h, hs[-1]), axis=1), emb, context)
            hs = hs[:-1]
        return self.out(h.astype(x.dtype))
