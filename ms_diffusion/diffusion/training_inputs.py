"""The per-batch randomness of diffusion training: timesteps, noise, self-conditioning coin, label dropout.

Two ways to draw it, with one definition of each piece:

* on the host (``draw_host_inputs``) from a ``numpy.random.Generator``: what the trainer does; resumable
  bit-for-bit, and the only way immiscible noise assignment works in a compiled step;
* in the graph (``complete_in_graph``) with MindSpore's seeded RNG ops, for ``diffusion(images)``
  inside a user's own ``ms.jit`` train step. Inputs the caller gives are used as they are.

Draw order (host): times, noise, offset noise, self-conditioning coin, label-dropout uniforms.
The in-graph ops are traced in the same order (their seeds depend on it).
"""
from __future__ import annotations

import random
from typing import Callable, Dict, Optional, Sequence, Tuple

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from ms_diffusion.diffusion.assignment import linear_sum_assignment, pairwise_distances

__all__ = ["SELF_COND_PROB", "offset_shape", "add_offset_noise", "drop_labels", "noise_assignment",
           "draw_host_inputs", "complete_in_graph"]

SELF_COND_PROB = 0.5   # lucidrains: self-condition on half of the batches


def offset_shape(shape: Sequence[int]) -> Tuple[int, ...]:
    """Offset noise is one draw per (sample, channel): (B, C, 1, 1) for images (B, C, H, W)."""
    return tuple(shape[:2]) + (1, 1)


def add_offset_noise(noise, offset, strength: float):
    """noise + strength * offset (numpy or Tensor; offset broadcasts over H, W)."""
    return noise + strength * offset


def drop_labels(classes, u, p: float, null_class: int):
    """Labels (B,) with each replaced by ``null_class`` where the uniform draw u (B,) in [0, 1) is < p.

    numpy in, numpy int32 out (host); Tensor in, int32 Tensor out (graph-safe).
    """
    if isinstance(classes, Tensor):
        return ops.where(u >= p, classes.astype(ms.int32), ops.full_like(classes, null_class, dtype=ms.int32))
    return np.where(u >= p, classes, null_class).astype(np.int32)


def noise_assignment(x_start: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Immiscible diffusion (Li et al. 2024): the permutation of noise (B, ...) closest to the batch.

    Returns indices (B,) so that noise[perm] minimises the summed Euclidean distance to x_start.
    lucidrains permutes the noise inside ``q_sample`` but keeps training against the unpermuted
    noise; the noise actually added must be the target, which is what we do.
    """
    b = x_start.shape[0]
    dist = pairwise_distances(x_start.reshape(b, -1), noise.reshape(b, -1))
    return linear_sum_assignment(dist)


def draw_host_inputs(images: np.ndarray, rng: np.random.Generator, classes: Optional[np.ndarray] = None, *,
                     num_timesteps: int, offset_noise_strength: float = 0.0, immiscible: bool = False,
                     normalize: Optional[Callable] = None, self_condition: bool = False,
                     num_classes: Optional[int] = None, cond_drop_prob: float = 0.0,
                     draw_times: Optional[Callable[[np.random.Generator, int], np.ndarray]] = None
                     ) -> Dict[str, object]:
    """A batch's training inputs drawn from ``rng``.

    ``images`` (B, C, H, W) as given to the loss; ``normalize`` maps them to model space (for the
    immiscible assignment). Returns numpy ``times`` (B,) int32 in [0, num_timesteps), ``noise``
    (B, C, H, W) float32 (offset noise and immiscible assignment applied), ``self_cond`` (bool) and
    ``classes`` (B,) int32 after label dropout (``num_classes`` is the null class), or None for an
    unconditional model. ``draw_times(rng, B)`` replaces the integer timesteps for a continuous-time
    objective (EDM's sigmas, flow matching's t; float32).
    """
    b = images.shape[0]
    if draw_times is None:
        times = rng.integers(0, num_timesteps, size=(b,)).astype(np.int32)
    else:
        times = np.asarray(draw_times(rng, b), np.float32)
    noise = rng.standard_normal(images.shape).astype(np.float32)
    if offset_noise_strength > 0:
        offset = rng.standard_normal(offset_shape(images.shape)).astype(np.float32)
        noise = add_offset_noise(noise, offset, offset_noise_strength)
    if immiscible:
        x_start = normalize(images) if normalize is not None else images
        noise = noise[noise_assignment(x_start, noise)]
    self_cond = bool(self_condition and rng.random() < SELF_COND_PROB)
    if classes is not None and num_classes is not None:
        classes = np.asarray(classes, np.int32).copy()
        if cond_drop_prob > 0:
            classes = drop_labels(classes, rng.random(b), float(cond_drop_prob), num_classes)
    elif classes is not None:
        classes = None
    return {"times": times, "noise": noise, "self_cond": self_cond, "classes": classes}


def complete_in_graph(x_start, classes=None, times=None, noise=None, self_cond=None, *, num_timesteps: int,
                      offset_noise_strength: float = 0.0, immiscible: bool = False, self_condition: bool = False,
                      num_classes: Optional[int] = None, cond_drop_prob: float = 0.0,
                      draw_times: Optional[Callable[[int], Tensor]] = None):
    """(times, noise, self_cond, classes) with the missing ones drawn by MindSpore's seeded RNG ops.

    x_start (B, C, H, W) in model space. Given times / noise are used as they are; labels are
    dropped with probability ``cond_drop_prob`` (0 when the caller already did). Graph-safe, except
    the immiscible assignment, which runs on the host (PyNative only: compiled training must pass
    noise). The self-conditioning coin is a Python draw, so a compiled graph fixes it at compile time.
    ``draw_times(B)``: a continuous-time objective's in-graph draw of its times (float32 (B,)).
    """
    b = x_start.shape[0]
    if times is None:
        times = ops.randint(0, num_timesteps, (b,), dtype=ms.int32) if draw_times is None else draw_times(b)
    if noise is None:
        noise = ops.standard_normal(x_start.shape).astype(x_start.dtype)
        if offset_noise_strength > 0:
            offset = ops.standard_normal(offset_shape(x_start.shape)).astype(x_start.dtype)
            noise = add_offset_noise(noise, offset, offset_noise_strength)
        if immiscible:
            assign = noise_assignment(x_start.asnumpy(), noise.asnumpy())
            noise = noise[Tensor(assign, ms.int32)]
    if self_cond is None:
        self_cond = self_condition and random.random() < SELF_COND_PROB
    if classes is not None and num_classes is not None:
        if cond_drop_prob > 0:
            u = ops.uniform((b,), Tensor(0.0, ms.float32), Tensor(1.0, ms.float32))
            classes = drop_labels(classes, u, cond_drop_prob, num_classes)
    return times, noise, self_cond, classes
