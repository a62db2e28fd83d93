"""Load a trained model from its checkpoint alone, and generate images with it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import mindspore as ms
import numpy as np

from ms_diffusion.config import ExperimentConfig, build_diffusion, config_from_dict
from ms_diffusion.interop.state import ConversionError, load_arrays_into
from ms_diffusion.samplers import resolve_sampler
from ms_diffusion.training.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, load_safetensors

__all__ = ["resolve_checkpoint", "load_diffusion", "generate", "Generated"]


def resolve_checkpoint(path: Union[str, Path]) -> Path:
    """A .ckpt / .safetensors file, or a run folder (its newest checkpoint, else model.safetensors)."""
    p = Path(path)
    if p.is_dir():
        found = latest_checkpoint(p / "checkpoints") or latest_checkpoint(p)
        if found is None and (p / "model.safetensors").is_file():
            found = p / "model.safetensors"
        if found is None:
            raise CheckpointError(f"no checkpoint in {str(p)!r} (looked for checkpoints/step_*.ckpt and "
                                  f"model.safetensors)")
        return found
    if not p.is_file():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist")
    return p


def load_diffusion(path: Union[str, Path], weights: str = "ema") -> Tuple[ExperimentConfig, "ms.nn.Cell", dict]:
    """Rebuild the diffusion model recorded in a checkpoint and load its ``ema`` or ``online`` weights.

    Returns (config, diffusion in eval mode, checkpoint metadata).
    """
    if weights not in ("ema", "online"):
        raise ValueError(f"weights must be 'ema' or 'online', got {weights!r}")
    p = resolve_checkpoint(path)
    if p.suffix == ".safetensors":
        arrays, meta = load_safetensors(p)
        if weights == "online" and meta.get("weights") == "ema":
            raise CheckpointError(f"{p} holds only EMA weights; use --weights ema or a training checkpoint")
        prefix = ""
    else:
        arrays, meta = load_checkpoint(p)
        prefix = f"{weights}."
    if "config" not in meta:
        raise CheckpointError(f"{p} has no experiment config in its metadata; it was not written by ms_diffusion")
    cfg = config_from_dict(meta["config"])
    diffusion = build_diffusion(cfg)
    selected = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    try:
        load_arrays_into(diffusion, selected)
    except ConversionError as err:
        raise CheckpointError(f"{p}: {err}") from None
    diffusion.set_train(False)
    meta = dict(meta)
    meta["path"] = str(p)
    return cfg, diffusion, meta


@dataclass
class Generated:
    images: np.ndarray                  # (N, C, H, W) in [0, 1]
    frames: List[np.ndarray]            # trajectory frames (N, C, H, W) in [0, 1], noise -> image
    frame_timesteps: List[int]


def generate(diffusion, num: int, *, batch_size: int = 64, seed: int = 0, sampler: Optional[str] = None,
             steps: Optional[int] = None, eta: Optional[float] = None, classes: Optional[Sequence[int]] = None,
             guidance_scale: float = 1.0, guidance_rescale: float = 0.0, gif_frames: int = 0,
             progress: bool = False, **sampler_options) -> Generated:
    """Sample ``num`` images in batches from one seeded generator; optionally keep ~gif_frames trajectory frames.

    ``sampler_options`` go to the sampler (e.g. ``order=2, karras=True`` for DPM-Solver++).
    """
    if num < 1 or batch_size < 1:
        raise ValueError(f"num and batch_size must be >= 1, got {num} and {batch_size}")
    rng = np.random.default_rng(seed)
    images, frames, frame_ts = [], [], []
    name = resolve_sampler(sampler or ("ddim" if diffusion.is_ddim_sampling else "ddpm"))
    total_steps = steps or (diffusion.num_timesteps if name == "ddpm" else diffusion.sampling_timesteps)
    every = max(total_steps // gif_frames, 1) if gif_frames else 0
    done = 0
    while done < num:
        b = min(batch_size, num - done)
        cls = None if classes is None else list(classes[done:done + b])
        result = diffusion.sample_with_trajectory(b, seed=rng, sampler=sampler, steps=steps, eta=eta, classes=cls,
                                                  guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                                                  log_every_t=every if done == 0 else 0, progress=progress,
                                                  **sampler_options)
        images.append(diffusion.unnormalize(result.sample).asnumpy())
        if done == 0 and every:
            frames = [diffusion.unnormalize(ms.Tensor(x)).asnumpy() for x in result.trajectory.xs]
            frame_ts = list(result.trajectory.timesteps)
        done += b
    return Generated(np.clip(np.concatenate(images), 0.0, 1.0), frames, frame_ts)
