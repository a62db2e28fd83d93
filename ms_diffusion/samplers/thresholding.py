"""Clipping of the x0 estimate: none, static [-1, 1], or Imagen's dynamic thresholding.

``clip_x0`` runs inside the denoiser's jit-compiled graph (mode, ratio and max value are
compile-time constants). Dynamic thresholding (Saharia et al. 2022; diffusers ``thresholding=True``):
per sample, s = the ``ratio`` quantile of |x0| (linear interpolation, as ``torch.quantile``),
clamped to [1, ``max_value``]; x0 is clamped to [-s, s] and divided by s. With ``max_value`` = 1 it
is static clipping.
"""
from __future__ import annotations

from typing import Optional, Union

import mindspore as ms
from mindspore import ops

__all__ = ["CLIP_MODES", "resolve_clip", "clip_x0", "dynamic_threshold"]

CLIP_MODES = ("none", "static", "dynamic")


def resolve_clip(clip: Optional[Union[bool, str]], default: Optional[Union[bool, str]] = "none") -> str:
    """A clip mode from True / False / None (``default``) / "none" / "static" / "dynamic"."""
    if clip is None:
        clip = default
    if clip is True:
        return "static"
    if clip is False or clip is None:
        return "none"
    if isinstance(clip, str) and clip.lower() in CLIP_MODES:
        return clip.lower()
    raise ValueError(f"unknown x0 clipping {clip!r}; choose True/False or one of {CLIP_MODES}")


def check_threshold(ratio: float, max_value: float) -> None:
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"dynamic thresholding ratio must lie in (0, 1], got {ratio}")
    if not max_value >= 1.0:
        raise ValueError(f"dynamic thresholding sample_max_value must be >= 1, got {max_value}")


def dynamic_threshold(x0: ms.Tensor, ratio: float = 0.995, max_value: float = 1.0) -> ms.Tensor:
    """Imagen dynamic thresholding of x0 (B, ...), per sample; ratio and max_value are Python floats."""
    b = x0.shape[0]
    flat = ops.abs(x0.reshape(b, -1))
    n = flat.shape[1]
    ordered, _ = ops.sort(flat, axis=1)
    pos = ratio * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    s = ordered[:, lo] * (1.0 - frac) + ordered[:, hi] * frac
    s = ops.clamp(s, 1.0, max_value).reshape((b,) + (1,) * (x0.ndim - 1))
    return ops.clamp(x0, -s, s) / s


def clip_x0(x0: ms.Tensor, mode: str = "static", ratio: float = 0.995, max_value: float = 1.0) -> ms.Tensor:
    """x0 (B, C, H, W) clipped per ``mode`` (one of ``CLIP_MODES``); graph-safe."""
    if mode == "static":
        return ops.clamp(x0, -1.0, 1.0)
    if mode == "dynamic":
        return dynamic_threshold(x0, ratio, max_value)
    return x0
