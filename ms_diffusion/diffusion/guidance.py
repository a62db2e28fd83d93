"""Classifier-free guidance (Ho & Salimans 2022) and guidance rescale (Lin et al. 2023), graph-safe.

The conditional and null-class passes run as one batch of 2B: ``guidance_batch`` doubles the
inputs, the network runs once, ``split_halves`` separates the outputs, ``guide`` combines them
as uncond + s (cond - uncond), optionally rescaled towards the conditional prediction's
per-sample std by phi (diffusers ``rescale_noise_cfg``). Scale and phi may be 0-d tensors (so a
new value does not recompile) or floats.
"""
from __future__ import annotations

from typing import Optional, Tuple

import mindspore as ms
from mindspore import Tensor, ops

__all__ = ["check_guidance", "guidance_batch", "split_halves", "cfg_combine", "rescale_guidance", "guide"]


def check_guidance(guidance_scale: float, guidance_rescale: float, conditional: bool) -> Tuple[bool, bool]:
    """Validate the guidance options; return (guided, rescaled) as Python bools (compile-time constants).

    ``conditional``: the network is class-conditional and classes were given.
    """
    guided = float(guidance_scale) != 1.0
    if guided and not conditional:
        raise ValueError("guidance_scale != 1 needs a class-conditional model (Unet(num_classes=...)) "
                         "and classes to guide towards")
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must lie in [0, 1], got {guidance_rescale}")
    if guidance_rescale > 0 and not guided:
        raise ValueError("guidance_rescale only acts on guided sampling: set guidance_scale != 1 too")
    return guided, float(guidance_rescale) > 0.0


def guidance_batch(x: Tensor, t: Tensor, x_self_cond: Optional[Tensor], classes: Tensor, null_class: int):
    """Inputs of B samples -> (x, t, x_self_cond, classes) of 2B: the B as given, then B with the null class."""
    classes = classes.astype(ms.int32)
    null = ops.full_like(classes, null_class, dtype=ms.int32)
    sc = None if x_self_cond is None else ops.cat((x_self_cond, x_self_cond), axis=0)
    return ops.cat((x, x), axis=0), ops.cat((t, t), axis=0), sc, ops.cat((classes, null), axis=0)


def split_halves(out: Tensor, b: int) -> Tuple[Tensor, Tensor]:
    """(2B, ...) -> the first B (conditional) and the last B (unconditional) rows."""
    return out[:b], out[b:]


def cfg_combine(cond: Tensor, uncond: Tensor, scale) -> Tensor:
    """uncond + scale (cond - uncond)."""
    return uncond + scale * (cond - uncond)


def rescale_guidance(guided: Tensor, cond: Tensor, phi) -> Tensor:
    """phi * guided * std(cond) / std(guided) + (1 - phi) * guided, std per sample over (C, H, W)."""
    axes = tuple(range(1, guided.ndim))
    ratio = cond.std(axis=axes, keepdims=True) / guided.std(axis=axes, keepdims=True)
    return phi * (guided * ratio) + (1.0 - phi) * guided


def guide(cond: Tensor, uncond: Tensor, scale, phi, rescaled: bool) -> Tensor:
    """Classifier-free guidance of two predictions (B, C, H, W), rescaled by phi if ``rescaled``."""
    guided = cfg_combine(cond, uncond, scale)
    if rescaled:
        guided = rescale_guidance(guided, cond, phi)
    return guided
