"""Timestep embeddings.

The two anchors' sinusoidal conventions are one formula with two switches (as in diffusers):
  freqs_i = exp(-ln(theta) * i / (half - downscale_freq_shift)),  i = 0 .. half-1
  emb     = cat(sin(t * freqs), cos(t * freqs))    or cat(cos, sin) with flip_sin_to_cos
lucidrains / the MindSpore tutorial: shift 1, sin-cos.  ldm / openai: shift 0, cos-sin.
"""
from __future__ import annotations

import math

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

__all__ = ["SinusoidalPosEmb", "RandomOrLearnedSinusoidalPosEmb", "timestep_frequencies"]


def timestep_frequencies(dim: int, theta: float = 10000.0, downscale_freq_shift: float = 1.0) -> np.ndarray:
    """The ``dim // 2`` frequencies of a sinusoidal embedding, float32 (computed as torch does)."""
    half = dim // 2
    if half - downscale_freq_shift <= 0:
        raise ValueError(f"sinusoidal embedding dim {dim} is too small for downscale_freq_shift "
                         f"{downscale_freq_shift}: use dim >= {2 * (int(downscale_freq_shift) + 1)}")
    step = math.log(theta) / (half - downscale_freq_shift)
    return np.exp(np.arange(half, dtype=np.float32) * np.float32(-step)).astype(np.float32)


class SinusoidalPosEmb(nn.Cell):
    """(B,) timesteps (int or float) -> (B, dim) float32 embedding. Odd ``dim`` is zero-padded."""

    def __init__(self, dim: int, theta: float = 10000.0, downscale_freq_shift: float = 1.0,
                 flip_sin_to_cos: bool = False):
        super().__init__()
        self.dim = dim
        self.flip_sin_to_cos = flip_sin_to_cos
        self.freqs = Tensor(timestep_frequencies(dim, theta, downscale_freq_shift)[None, :])
        self.pad = dim % 2

    def construct(self, t):
        args = t.astype(ms.float32)[:, None] * self.freqs
        if self.flip_sin_to_cos:
            emb = ops.cat((ops.cos(args), ops.sin(args)), axis=-1)
        else:
            emb = ops.cat((ops.sin(args), ops.cos(args)), axis=-1)
        if self.pad:
            emb = ops.cat((emb, ops.zeros((emb.shape[0], 1), emb.dtype)), axis=-1)
        return emb


class RandomOrLearnedSinusoidalPosEmb(nn.Cell):
    """Random (fixed) or learned Fourier features (Crowson): (B,) -> (B, dim + 1) = [t, sin, cos]."""

    def __init__(self, dim: int, is_random: bool = False):
        super().__init__()
        if dim % 2:
            raise ValueError(f"learned_sinusoidal_dim must be even, got {dim}")
        self.weights = Parameter(Tensor(np.random.randn(dim // 2).astype(np.float32)),
                                 name="weights", requires_grad=not is_random)

    def construct(self, t):
        x = t.astype(ms.float32)[:, None]
        freqs = x * self.weights[None, :] * (2.0 * math.pi)
        return ops.cat((x, ops.sin(freqs), ops.cos(freqs)), axis=-1)
