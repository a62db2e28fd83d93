"""Layer 1: Cells with parameters and no knowledge of diffusion."""
from ms_diffusion.nn.attention import Attention, LinearAttention, attention
from ms_diffusion.nn.blocks import Block, ConvNextBlock, ResnetBlock
from ms_diffusion.nn.embeddings import RandomOrLearnedSinusoidalPosEmb, SinusoidalPosEmb
from ms_diffusion.nn.layers import GELU, Identity, SiLU, conv2d, dense
from ms_diffusion.nn.norms import ChannelLayerNorm, GroupNorm, RMSNorm
from ms_diffusion.nn.resample import ConvDownsample, ConvTransposeUpsample, Downsample, Upsample

__all__ = ["Attention", "LinearAttention", "attention", "Block", "ConvNextBlock", "ResnetBlock",
           "RandomOrLearnedSinusoidalPosEmb", "SinusoidalPosEmb", "GELU", "Identity", "SiLU", "conv2d", "dense",
           "ChannelLayerNorm", "GroupNorm", "RMSNorm", "ConvDownsample", "ConvTransposeUpsample", "Downsample",
           "Upsample"]
