"""Load a trained model from its checkpoint alone, and generate images with it.

A latent-diffusion checkpoint holds its first stage's weights (``first_stage_model.*``) and its
architecture (metadata ``first_stage``), so it loads without the autoencoder run it was trained on; a
pretrained text encoder likewise (metadata ``text_encoder``). A text-conditional one takes its tokenizer
from its run folder's ``tokenizer/`` copy (else from its config), and only if that tokenizer's fingerprint
is the one recorded at training (metadata ``tokenizer_sha256``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import mindspore as ms
import numpy as np

from ms_diffusion.config import ExperimentConfig, config_from_dict
from ms_diffusion.diffusion.latent import LatentSpace
from ms_diffusion.experiment import (build_recorded_diffusion, check_tokenizer, load_autoencoder,
                                    load_weights_into, use_run_tokenizer)
from ms_diffusion.io.checkpoint import CheckpointError
from ms_diffusion.io.weights import read_weights, resolve_checkpoint

__all__ = ["resolve_checkpoint", "read_weights", "load_diffusion", "load_autoencoder", "describe_degenerate",
           "to_images", "generate", "Generated", "cycled_classes", "cycled_prompts"]


def cycled_classes(num: int, num_classes: Optional[int]) -> Optional[List[int]]:
    """Labels 0, 1, ..., num_classes - 1, 0, 1, ... for ``num`` images (every class equally often); None for an
    unconditional model (``num_classes`` None or 0)."""
    return [i % num_classes for i in range(num)] if num_classes else None


def describe_degenerate(images: np.ndarray) -> Optional[str]:
    """A warning if generated images (N, C, H, W) are not images at all: NaN/inf pixels, or every image one flat
    value (what a diverged or barely trained model gives); None otherwise."""
    images = np.asarray(images)
    flat = images.reshape(images.shape[0], -1)
    nonfinite = int((~np.isfinite(flat)).any(axis=1).sum())
    if nonfinite:
        return f"{nonfinite} of the {len(flat)} images contain NaN or infinite values"
    spread = flat.max(axis=1) - flat.min(axis=1)
    if len(flat) and (spread <= 1e-6).all():
        values = np.unique(np.round(flat[:, 0], 3))
        shown = ", ".join(f"{v:.3f}" for v in values[:4]) + (", ..." if len(values) > 4 else "")
        return (f"all {len(flat)} images are constant (every pixel of an image has one value: {shown}); the weights "
                f"do not produce images -- a diverged or barely trained run?")
    return None


def load_diffusion(path: Union[str, Path], weights: str = "ema", log: Optional[Callable[[str], None]] = None
                   ) -> Tuple[ExperimentConfig, "ms.nn.Cell", dict]:
    """Rebuild the diffusion model recorded in a checkpoint and load its ``ema`` or ``online`` weights.

    Returns (config, diffusion in eval mode, checkpoint metadata). ``path`` as for ``read_weights`` (a run
    folder falls back past an unreadable newest file, saying so through ``log``).
    """
    if weights not in ("ema", "online"):
        raise ValueError(f"weights must be 'ema' or 'online', got {weights!r}")
    p, selected, meta = read_weights(path, weights, log)
    cfg = config_from_dict(meta["config"])
    if cfg.is_autoencoder:
        raise CheckpointError(f"{p} is an autoencoder checkpoint, not a diffusion model: name its run as "
                              f"diffusion.first_stage of a `latent` config and train the latent diffusion")
    use_run_tokenizer(cfg, p.parent.parent if p.parent.name == "checkpoints" else p.parent)
    diffusion = build_recorded_diffusion(cfg, meta)
    check_tokenizer(diffusion, meta, p)
    load_weights_into(diffusion, selected, p)
    diffusion.set_train(False)
    meta = dict(meta)
    meta["path"] = str(p)
    return cfg, diffusion, meta


def to_images(diffusion, x: ms.Tensor) -> ms.Tensor:
    """A sampler's output in model space -> images (B, C, H, W) in [0, 1] (latents are decoded)."""
    if isinstance(diffusion, LatentSpace):
        return diffusion.decode_to_images(x)
    return diffusion.unnormalize(x)


@dataclass
class Generated:
    images: np.ndarray                  # (N, C, H, W) in [0, 1]
    frames: List[np.ndarray]            # trajectory frames (N, C, H, W) in [0, 1], noise -> image
    frame_timesteps: List[int]


def cycled_prompts(num: int, prompts: Sequence[str]) -> List[str]:
    """``prompts`` in turn for ``num`` images."""
    if not prompts:
        raise ValueError("a text-conditional model needs at least one prompt")
    return [prompts[i % len(prompts)] for i in range(num)]


def generate(diffusion, num: int, *, batch_size: int = 64, seed: int = 0, sampler: Optional[str] = None,
             steps: Optional[int] = None, eta: Optional[float] = None, classes: Optional[Sequence[int]] = None,
             guidance_scale: float = 1.0, guidance_rescale: float = 0.0, gif_frames: int = 0,
             progress: bool = False, prompts: Optional[Sequence[str]] = None, negative_prompt: Optional[str] = None,
             **sampler_options) -> Generated:
    """Sample ``num`` images in batches from one seeded generator; optionally keep ~gif_frames trajectory frames.

    ``sampler_options`` go to the sampler (e.g. ``order=2, karras=True`` for DPM-Solver++). A text-conditional
    latent diffusion takes ``prompts`` (one per image) and ``negative_prompt`` instead of ``classes``.
    """
    if prompts is not None and len(prompts) != num:
        raise ValueError(f"{len(prompts)} prompts for {num} images (cycled_prompts repeats a list)")
    if num < 1 or batch_size < 1:
        raise ValueError(f"num and batch_size must be >= 1, got {num} and {batch_size}")
    rng = np.random.default_rng(seed)
    images, frames, frame_ts = [], [], []
    _, total_steps = diffusion.sampling_plan(sampler, steps)
    every = max(total_steps // gif_frames, 1) if gif_frames else 0
    done = 0
    while done < num:
        b = min(batch_size, num - done)
        cls = None if classes is None else list(classes[done:done + b])
        if prompts is not None:
            cls, sampler_options["uncond"] = diffusion.prompt_conditioning(
                prompts[done:done + b], b, negative_prompt, guided=guidance_scale != 1.0)
        result = diffusion.sample_with_trajectory(b, seed=rng, sampler=sampler, steps=steps, eta=eta, classes=cls,
                                                  guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                                                  log_every_t=every if done == 0 else 0, progress=progress,
                                                  **sampler_options)
        images.append(to_images(diffusion, result.sample).asnumpy())
        if done == 0 and every:
            frames = [to_images(diffusion, ms.Tensor(x)).asnumpy() for x in result.trajectory.xs]
            frame_ts = list(result.trajectory.timesteps)
        done += b
    return Generated(np.clip(np.concatenate(images), 0.0, 1.0), frames, frame_ts)
