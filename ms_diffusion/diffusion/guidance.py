"""Classifier-free guidance (Ho & Salimans 2022) and guidance rescale (Lin et al. 2023), graph-safe.

The conditional and unconditional passes run as one batch of 2B: ``guidance_batch`` doubles the
inputs (the second half gets the null class; a tensor conditioning -- text embeddings -- brings both
halves itself, built by ``stack_halves``), the network runs once, ``split_halves`` separates the outputs, ``guide`` combines them
as uncond + s (cond - uncond), optionally rescaled towards the conditional prediction's
per-sample std by phi (diffusers ``rescale_noise_cfg``). Scale and phi may be 0-d tensors (so a
new value does not recompile) or floats.
"""
from __future__ import annotations

from typing import Optional, Tuple

import mindspore as ms
from mindspore import Tensor, ops

__all__ = ["check_guidance", "guidance_batch", "stack_halves", "split_halves", "cfg_combine", "rescale_guidance",
           "guide"]


def check_guidance(guidance_scale: float, guidance_rescale: float, conditional: bool) -> Tuple[bool, bool]:
    """Validate the guidance options; return (guided, rescaled) as Python bools (compile-time constants).

    ``conditional``: there is something to guide towards -- a class-conditional model and classes, or a
    tensor conditioning and its unconditional counterpart.
    """
    guided = float(guidance_scale) != 1.0
    if guided and not conditional:
        raise ValueError("guidance_scale != 1 needs a conditional model and something to guide towards: classes "
                         "for a class-conditional model (Unet(num_classes=...)), or cond and uncond (e.g. the "
                         "prompt's and the empty prompt's embeddings) for a tensor conditioning")
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must lie in [0, 1], got {guidance_rescale}")
    if guidance_rescale > 0 and not guided:
        raise ValueError("guidance_rescale only acts on guided sampling: set guidance_scale != 1 too")
    return guided, float(guidance_rescale) > 0.0


def guidance_batch(x: Tensor, t: Tensor, x_self_cond: Optional[Tensor], classes, null_class: Optional[int]):
    """Inputs of B samples -> (x, t, x_self_cond, classes) of 2B: the B as given, then B with the null class.

    ``null_class`` None: ``classes`` is a tensor conditioning that already holds both halves (``stack_halves``).
    """
    sc = None if x_self_cond is None else ops.cat((x_self_cond, x_self_cond), axis=0)
    if null_class is None:
        return ops.cat((x, x), axis=0), ops.cat((t, t), axis=0), sc, classes
    classes = classes.astype(ms.int32)
    null = ops.full_like(classes, null_class, dtype=ms.int32)
    return ops.cat((x, x), axis=0), ops.cat((t, t), axis=0), sc, ops.cat((classes, null), axis=0)


def stack_halves(cond, uncond):
    """A tensor conditioning for the guided 2B batch: (B, ...) conditional rows then (B, ...) unconditional ones
    (element-wise for a tuple such as hybrid's (c_concat, c_crossattn))."""
    if isinstance(cond, (tuple, list)):
        return tuple(ops.cat((c, u), axis=0) for c, u in zip(cond, uncond))
    return ops.cat((cond, uncond), axis=0)


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
