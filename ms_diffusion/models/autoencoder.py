"""ldm's KL-regularised autoencoder: ``Encoder``, ``Decoder``, ``AutoencoderKL``.

Images are (B, in_channels, H, W) in [-1, 1]; latents (B, embed_dim, H / f, W / f) with
f = 2^(len(ch_mult) - 1). The parameter tree is ldm's (``ldm/modules/diffusionmodules/model.py``):
``encoder.conv_in``, ``encoder.down.{i}.block.{j}.{norm1,conv1,norm2,conv2,nin_shortcut}``,
``encoder.down.{i}.attn.{j}.{norm,q,k,v,proj_out}``, ``encoder.down.{i}.downsample.conv``,
``encoder.mid.{block_1,attn_1,block_2}``, ``encoder.norm_out``, ``encoder.conv_out``, the same for
the decoder with ``up.{i}`` (``up.{i}.upsample.conv``; index 0 is the full-resolution level, as in
ldm), ``quant_conv``, ``post_quant_conv``. Only GroupNorm differs: ``gamma``/``beta`` for torch's
``weight``/``bias``. diffusers' ``AutoencoderKL`` is the same network under other names.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from ms_diffusion.models.distributions import DiagonalGaussianDistribution, gaussian_sample, split_moments
from ms_diffusion.models.unet_ldm import make_upsample
from ms_diffusion.nn.attention import attention, flash_attention_available
from ms_diffusion.nn.layers import Identity, SiLU, conv2d, dense, expand_as
from ms_diffusion.nn.norms import GroupNorm

__all__ = ["Encoder", "Decoder", "AutoencoderKL", "ResnetBlock", "AttnBlock", "Downsample", "make_attn",
           "ATTN_TYPES"]

ATTN_TYPES = ("vanilla", "none")


def _normalize(channels: int, num_groups: int) -> GroupNorm:
    return GroupNorm(num_groups, channels, eps=1e-6)


class ResnetBlock(nn.Cell):
    """GroupNorm-SiLU-conv3x3 (+ time embedding) GroupNorm-SiLU-dropout-conv3x3, plus a shortcut.

    x (B, in_channels, H, W), temb (B, temb_channels) or None -> (B, out_channels, H, W). The
    shortcut is a 3x3 ``conv_shortcut`` or 1x1 ``nin_shortcut`` when the width changes.
    """

    def __init__(self, in_channels: int, out_channels: Optional[int] = None, conv_shortcut: bool = False,
                 dropout: float = 0.0, temb_channels: int = 512, num_groups: int = 32):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = _normalize(in_channels, num_groups)
        self.conv1 = conv2d(in_channels, out_channels, 3)
        self.has_temb = temb_channels > 0
        if self.has_temb:
            self.temb_proj = dense(temb_channels, out_channels)
        self.norm2 = _normalize(out_channels, num_groups)
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else Identity()
        self.conv2 = conv2d(out_channels, out_channels, 3)
        self.act = SiLU()
        self.shortcut_kind = "none"
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = conv2d(in_channels, out_channels, 3)
                self.shortcut_kind = "conv"
            else:
                self.nin_shortcut = conv2d(in_channels, out_channels, 1)
                self.shortcut_kind = "nin"

    def construct(self, x, temb=None):
        h = self.conv1(self.act(self.norm1(x)))
        if self.has_temb and temb is not None:
            h = h + expand_as(self.temb_proj(self.act(temb))[:, :, None, None], h)
        h = self.conv2(self.dropout(self.act(self.norm2(h))))
        if self.shortcut_kind == "conv":
            x = self.conv_shortcut(x)
        elif self.shortcut_kind == "nin":
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Cell):
    """Single-head self-attention over the pixels with 1x1-conv q/k/v/proj_out and a residual. (B, C, H, W) -> same."""

    def __init__(self, in_channels: int, num_groups: int = 32, flash: bool = False):
        super().__init__()
        self.norm = _normalize(in_channels, num_groups)
        self.q = conv2d(in_channels, in_channels, 1)
        self.k = conv2d(in_channels, in_channels, 1)
        self.v = conv2d(in_channels, in_channels, 1)
        self.proj_out = conv2d(in_channels, in_channels, 1)
        self.scale = in_channels ** -0.5
        self.use_flash = bool(flash) and flash_attention_available(in_channels)
        self.attention_slice = 0

    def construct(self, x):
        b, c, h, w = x.shape
        hn = self.norm(x)
        shape = (b, 1, c, h * w)                                  # one head, channels first
        out = attention(self.q(hn).reshape(shape), self.k(hn).reshape(shape), self.v(hn).reshape(shape), self.scale,
                        self.use_flash, channels_first=True, slice_size=self.attention_slice)
        return x + self.proj_out(out.reshape(b, c, h, w))


def _blend(a: np.ndarray, b: np.ndarray, extent: int, axis: int) -> None:
    """Blend the first ``extent`` rows (axis 2) or columns (axis 3) of b, in place, from a's last ones to b's
    own with weights linear in the position (diffusers' ``blend_v`` / ``blend_h``)."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent <= 0:
        return
    w = (np.arange(extent, dtype=np.float64) / extent).astype(b.dtype)
    w = w.reshape((1, 1, extent, 1) if axis == 2 else (1, 1, 1, extent))
    tail = a[:, :, -extent:, :] if axis == 2 else a[:, :, :, -extent:]
    if axis == 2:
        b[:, :, :extent, :] = tail * (1 - w) + b[:, :, :extent, :] * w
    else:
        b[:, :, :, :extent] = tail * (1 - w) + b[:, :, :, :extent] * w


def check_attn_type(attn_type: str) -> None:
    if attn_type == "linear":
        raise ValueError("attn_type='linear' is not supported: ldm's LinAttnBlock has no residual or norm and no "
                         "released autoencoder uses it; choose 'vanilla' or 'none'")
    if attn_type not in ATTN_TYPES:
        raise ValueError(f"unknown attn_type {attn_type!r}; choose one of {ATTN_TYPES}")


def make_attn(in_channels: int, attn_type: str = "vanilla", num_groups: int = 32, flash: bool = False) -> nn.Cell:
    """``"vanilla"``: AttnBlock; ``"none"``: identity (no parameters)."""
    check_attn_type(attn_type)
    if attn_type == "vanilla":
        return AttnBlock(in_channels, num_groups, flash)
    return Identity()


class Downsample(nn.Cell):
    """x1/2 as ldm's encoder: zero-pad right/bottom by 1, 3x3 stride-2 conv (``conv``); or 2x2 average pooling."""

    def __init__(self, in_channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = bool(with_conv)
        if self.with_conv:
            self.conv = conv2d(in_channels, in_channels, 3, stride=2, padding=0)
            # the Pad primitive, not ops.pad / nn.ZeroPad2d: in a compiled graph on CPU (MindSpore 2.10) their
            # backward hangs, spinning one core, on the 18th call of the step (tests/test_autoencoder.py)
            self.pad = ops.Pad(((0, 0), (0, 0), (0, 1), (0, 1)))

    def construct(self, x):
        if self.with_conv:
            return self.conv(self.pad(x))
        return ops.avg_pool2d(x, kernel_size=2, stride=2)


class _Level(nn.Cell):
    """One resolution level: ``block`` (ResnetBlocks), ``attn`` (one per block, or none) and an optional resampler."""

    def __init__(self, blocks, attns, resample_name: Optional[str], resample: Optional[nn.Cell]):
        super().__init__()
        self.block = nn.CellList(blocks)
        self.attn = nn.CellList(attns)
        self.num_blocks = len(blocks)
        self.has_attn = len(attns) > 0
        self.resample_name = resample_name
        if resample_name == "downsample":
            self.downsample = resample
        elif resample_name == "upsample":
            self.upsample = resample

    def construct(self, h):
        for j in range(self.num_blocks):
            h = self.block[j](h)
            if self.has_attn:
                h = self.attn[j](h)
        if self.resample_name == "downsample":
            h = self.downsample(h)
        elif self.resample_name == "upsample":
            h = self.upsample(h)
        return h


class _Mid(nn.Cell):
    def __init__(self, channels: int, dropout: float, attn_type: str, num_groups: int, flash: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout=dropout, temb_channels=0, num_groups=num_groups)
        self.attn_1 = make_attn(channels, attn_type, num_groups, flash)
        self.block_2 = ResnetBlock(channels, channels, dropout=dropout, temb_channels=0, num_groups=num_groups)

    def construct(self, h):
        return self.block_2(self.attn_1(self.block_1(h)))


def _check_common(ch: int, ch_mult: Sequence[int], num_res_blocks: int, attn_type: str) -> None:
    if ch < 1 or not ch_mult or num_res_blocks < 1:
        raise ValueError(f"need ch >= 1, a non-empty ch_mult and num_res_blocks >= 1 "
                         f"(got ch={ch}, ch_mult={ch_mult}, num_res_blocks={num_res_blocks})")
    check_attn_type(attn_type)


class Encoder(nn.Cell):
    """Image (B, in_channels, H, W) in [-1, 1] -> (B, 2 * z_channels (double_z) or z_channels, H / f, W / f).

    ``out_ch``, ``give_pre_end`` and ``tanh_out`` are decoder options, accepted and ignored (ldm
    passes one ``ddconfig`` to both).
    """

    def __init__(self, *, ch: int, ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int,
                 attn_resolutions: Sequence[int], dropout: float = 0.0, resamp_with_conv: bool = True,
                 in_channels: int, resolution: int, z_channels: int, double_z: bool = True,
                 use_linear_attn: bool = False, attn_type: str = "vanilla", out_ch: Optional[int] = None,
                 give_pre_end: bool = False, tanh_out: bool = False, norm_num_groups: int = 32,
                 flash_attn: bool = False):
        super().__init__()
        if use_linear_attn:
            attn_type = "linear"
        _check_common(ch, ch_mult, num_res_blocks, attn_type)
        self.in_channels = in_channels
        self.num_resolutions = len(ch_mult)
        self.conv_in = conv2d(in_channels, ch, 3)
        in_ch_mult = (1,) + tuple(ch_mult)
        curr_res = resolution
        levels = []
        block_in = ch
        for i_level in range(self.num_resolutions):
            blocks, attns = [], []
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, dropout=dropout, temb_channels=0,
                                          num_groups=norm_num_groups))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attns.append(make_attn(block_in, attn_type, norm_num_groups, flash_attn))
            last = i_level == self.num_resolutions - 1
            levels.append(_Level(blocks, attns, None if last else "downsample",
                                 None if last else Downsample(block_in, resamp_with_conv)))
            if not last:
                curr_res //= 2
        self.down = nn.CellList(levels)
        self.mid = _Mid(block_in, dropout, attn_type, norm_num_groups, flash_attn)
        self.norm_out = _normalize(block_in, norm_num_groups)
        self.act = SiLU()
        self.conv_out = conv2d(block_in, 2 * z_channels if double_z else z_channels, 3)

    def construct(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(self.act(self.norm_out(h)))


class Decoder(nn.Cell):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, h * f, w * f) (unbounded, or tanh with ``tanh_out``).

    ``give_pre_end`` returns the last feature map before ``norm_out`` instead. ``in_channels`` and
    ``double_z`` are encoder options, accepted and ignored.
    """

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int,
                 attn_resolutions: Sequence[int], dropout: float = 0.0, resamp_with_conv: bool = True,
                 in_channels: Optional[int] = None, resolution: int, z_channels: int, give_pre_end: bool = False,
                 tanh_out: bool = False, use_linear_attn: bool = False, attn_type: str = "vanilla",
                 double_z: bool = True, norm_num_groups: int = 32, flash_attn: bool = False):
        super().__init__()
        if use_linear_attn:
            attn_type = "linear"
        _check_common(ch, ch_mult, num_res_blocks, attn_type)
        self.num_resolutions = len(ch_mult)
        self.give_pre_end = bool(give_pre_end)
        self.tanh_out = bool(tanh_out)
        self.z_channels = z_channels
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.z_shape = (1, z_channels, curr_res, curr_res)
        self.conv_in = conv2d(z_channels, block_in, 3)
        self.mid = _Mid(block_in, dropout, attn_type, norm_num_groups, flash_attn)
        levels = [None] * self.num_resolutions
        for i_level in reversed(range(self.num_resolutions)):
            blocks, attns = [], []
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, dropout=dropout, temb_channels=0,
                                          num_groups=norm_num_groups))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attns.append(make_attn(block_in, attn_type, norm_num_groups, flash_attn))
            first = i_level == 0
            levels[i_level] = _Level(blocks, attns, None if first else "upsample",
                                     None if first else make_upsample(block_in, resamp_with_conv))
            if not first:
                curr_res *= 2
        self.up = nn.CellList(levels)   # up[0] is the full-resolution level, run last
        self.norm_out = _normalize(block_in, norm_num_groups)
        self.act = SiLU()
        self.conv_out = conv2d(block_in, out_ch, 3)

    def trunk(self, z):
        """Latent -> the last feature map before ``norm_out`` (what ``give_pre_end`` returns)."""
        h = self.mid(self.conv_in(z))
        for i in range(self.num_resolutions - 1, -1, -1):
            h = self.up[i](h)
        return h

    def features(self, z):
        """Latent -> the input of ``conv_out`` (after ``norm_out`` and SiLU)."""
        return self.act(self.norm_out(self.trunk(z)))

    def conv_out_linear(self, h, weight):
        """``conv_out`` without its bias and with a given ``weight`` (for gradients with respect to the weight)."""
        return ops.conv2d(h, weight, None, 1, "pad", 1)

    def output_activation(self, a):
        """``conv_out``'s output -> image: tanh when ``tanh_out``, else unchanged."""
        return ops.tanh(a) if self.tanh_out else a

    def construct(self, z):
        h = self.trunk(z)
        if self.give_pre_end:
            return h
        return self.output_activation(self.conv_out(self.act(self.norm_out(h))))


_ENCODER_KEYS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "resamp_with_conv", "in_channels",
                 "resolution", "z_channels", "double_z", "use_linear_attn", "attn_type", "out_ch", "give_pre_end",
                 "tanh_out", "norm_num_groups", "flash_attn")


class AutoencoderKL(nn.Cell):
    """KL autoencoder: images (B, C, H, W) in [-1, 1] <-> latents (B, embed_dim, H / f, W / f).

    ``ddconfig`` is ldm's dict (``double_z`` must be true). ``construct(x, sample_posterior=True,
    noise=None)`` returns (reconstruction (B, out_ch, H, W), posterior moments (B, 2 * embed_dim,
    H / f, W / f)); wrap the moments in ``DiagonalGaussianDistribution`` for kl / nll / mode.
    """

    def __init__(self, ddconfig: Mapping[str, Any], embed_dim: int):
        super().__init__()
        config: Dict[str, Any] = dict(ddconfig)
        unknown = sorted(set(config) - set(_ENCODER_KEYS))
        if unknown:
            raise ValueError(f"unknown ddconfig key(s) {unknown}; known keys: {list(_ENCODER_KEYS)}")
        missing = [k for k in ("ch", "num_res_blocks", "attn_resolutions", "in_channels", "resolution",
                               "z_channels", "out_ch") if k not in config]
        if missing:
            raise ValueError(f"ddconfig is missing {missing}")
        if not config.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig double_z=True (the encoder predicts mean and log-variance)")
        if embed_dim < 1:
            raise ValueError(f"embed_dim must be positive, got {embed_dim}")
        self.ddconfig = config
        self.embed_dim = int(embed_dim)
        self.in_channels = int(config["in_channels"])
        self.out_channels = int(config["out_ch"])
        self.num_downsamples = len(config.get("ch_mult", (1, 2, 4, 8))) - 1
        self.encoder = Encoder(**config)
        self.decoder = Decoder(**config)
        z = int(config["z_channels"])
        self.quant_conv = conv2d(2 * z, 2 * embed_dim, 1)
        self.post_quant_conv = conv2d(embed_dim, z, 1)
        self.tiling: Optional[tuple] = None      # (tile_size, overlap) with enable_tiling

    @property
    def downsample_factor(self) -> int:
        return 2 ** self.num_downsamples

    def latent_shape(self, image_shape: Sequence[int]) -> tuple:
        """(B, C, H, W) of images -> (B, embed_dim, H / f, W / f) of latents."""
        self.check_input_shape(image_shape)
        f = self.downsample_factor
        return (image_shape[0], self.embed_dim, image_shape[2] // f, image_shape[3] // f)

    def check_input_shape(self, shape: Sequence[int]) -> None:
        """Raise ValueError naming the problem if images of this shape cannot be encoded."""
        if len(shape) != 4:
            raise ValueError(f"AutoencoderKL expects (batch, channels, height, width) images, got {tuple(shape)}")
        if shape[1] != self.in_channels:
            raise ValueError(f"AutoencoderKL was built for {self.in_channels}-channel images, got {shape[1]}; "
                             f"convert the data or set ddconfig in_channels/out_ch")
        f = self.downsample_factor
        if shape[2] % f or shape[3] % f:
            raise ValueError(f"image size {shape[2]}x{shape[3]} is not divisible by {f} (the encoder halves it "
                             f"{self.num_downsamples} times); pad or resize the images")

    def enable_tiling(self, tile_size: int = 512, overlap: float = 0.25) -> None:
        """Let ``tiled(fn, x)`` encode / decode images larger than ``tile_size`` pixels (``tile_size / f``
        latents) tile by tile, as diffusers' ``AutoencoderKL.enable_tiling``: tiles overlap by ``overlap``,
        neighbours are blended linearly across the overlap, so memory stays that of one tile at the cost of
        slight seams."""
        f = self.downsample_factor
        if tile_size < f or tile_size % f:
            raise ValueError(f"tile_size must be a positive multiple of the downsampling factor {f}, got {tile_size}")
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must lie in [0, 1), got {overlap}")
        self.tiling = (int(tile_size), float(overlap))

    def disable_tiling(self) -> None:
        self.tiling = None

    def tiled(self, fn, x, latents: bool):
        """``fn(x)`` (host side), tile by tile when tiling is enabled and x is larger than a tile.

        ``fn``: the encoder to moments (``latents=False``: x images (B, C, H, W)) or the decoder
        (``latents=True``: x latents (B, z, h, w)), compiled or not. Tiles overlap (stride tile (1 - overlap)),
        outputs are blended across int(tile_out * overlap) and cropped, as diffusers' tiled encode / decode."""
        if self.tiling is None:
            return fn(x)
        tile, overlap = self.tiling
        f = self.downsample_factor
        tile_in, tile_out = (tile // f, tile) if latents else (tile, tile // f)
        if x.shape[2] <= tile_in and x.shape[3] <= tile_in:
            return fn(x)
        stride = int(tile_in * (1 - overlap))
        extent = int(tile_out * overlap)
        limit = tile_out - extent
        rows = [[fn(x[:, :, i:i + tile_in, j:j + tile_in]).asnumpy() for j in range(0, x.shape[3], stride)]
                for i in range(0, x.shape[2], stride)]
        out_rows = []
        for i, row in enumerate(rows):
            for j, part in enumerate(row):
                if i > 0:
                    _blend(rows[i - 1][j], part, extent, axis=2)
                if j > 0:
                    _blend(row[j - 1], part, extent, axis=3)
            out_rows.append(np.concatenate([t[:, :, :limit, :limit] for t in row], axis=3))
        return ms.Tensor(np.concatenate(out_rows, axis=2))

    def encode_moments(self, x):
        """Images (B, C, H, W) in [-1, 1] -> posterior moments (B, 2 * embed_dim, H / f, W / f)."""
        return self.quant_conv(self.encoder(x))

    def encode(self, x) -> DiagonalGaussianDistribution:
        """Images -> the posterior q(z | x) (host-side object; compiled code uses ``encode_moments``)."""
        self.check_input_shape(x.shape)
        return DiagonalGaussianDistribution(self.encode_moments(x))

    def decode(self, z):
        """Latents (B, embed_dim, h, w) -> images (B, out_ch, h * f, w * f), nominally in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def get_last_layer(self) -> ms.Parameter:
        """The decoder's last weight, where the adaptive GAN weight measures gradients."""
        return self.decoder.conv_out.weight

    def construct(self, x, sample_posterior: bool = True, noise=None):
        moments = self.encode_moments(x)
        mean, logvar = split_moments(moments)
        z = gaussian_sample(mean, logvar, noise) if sample_posterior else mean
        return self.decode(z), moments
