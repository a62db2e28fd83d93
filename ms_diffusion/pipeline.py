"""Load a trained model from its checkpoint alone, and generate images with it.

A latent-diffusion checkpoint holds its first stage's weights (``first_stage_model.*``) and its
architecture (metadata ``first_stage``), so it loads without the autoencoder run it was trained on.
"""
from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import mindspore as ms
import numpy as np

from ms_diffusion.config import ExperimentConfig, build_diffusion, build_model, build_network, config_from_dict
from ms_diffusion.diffusion import LatentDiffusion
from ms_diffusion.interop.state import ConversionError, load_arrays_into
from ms_diffusion.models import AutoencoderKL
from ms_diffusion.samplers import resolve_sampler
from ms_diffusion.training.checkpoint import (META_KEY, CheckpointError, latest_checkpoint, list_checkpoints,
                                              load_checkpoint, load_safetensors, skipped_checkpoint_line)

__all__ = ["resolve_checkpoint", "read_weights", "load_diffusion", "load_autoencoder", "describe_degenerate",
           "to_images", "generate", "Generated"]


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


_TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def _pytorch_kind(p: Path) -> Optional[str]:
    """What PyTorch file ``p`` is, by its first bytes (or, failing that, its extension), or None."""
    import zipfile

    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError:
        return None
    if head == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(p) as z:
                if any(name.endswith("data.pkl") for name in z.namelist()):
                    return "a torch.save zip archive"
        except (OSError, zipfile.BadZipFile):
            pass
        return "a zip archive" if p.suffix.lower() in _TORCH_SUFFIXES else None
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a legacy torch.save pickle"
    if p.suffix.lower() in _TORCH_SUFFIXES:
        return f"a {p.suffix} file"
    return None


def _check_not_pytorch(p: Path) -> None:
    kind = _pytorch_kind(p)
    if kind is not None:
        raise CheckpointError(
            f"{p} is a PyTorch checkpoint ({kind}), not an ms_diffusion one: convert it with "
            f"scripts/convert_checkpoint.py, e.g. python scripts/convert_checkpoint.py from-lucidrains {p} "
            f"{p.stem}_ms.ckpt for a denoising-diffusion-pytorch model (from-ldm for ldm / Stable "
            f"Diffusion, from-diffusers for a diffusers folder; see docs/interop.md), then load the converted file")


def _read_weights(p: Path, weights: str) -> Tuple[Dict[str, np.ndarray], dict]:
    """({name: array} of the ``weights`` group ("ema" / "online"), metadata) of a checkpoint or export."""
    _check_not_pytorch(p)   # MindSpore's own message for these is about its file format, not the fix
    if p.suffix == ".safetensors":
        arrays, meta = load_safetensors(p)   # an export: one set of weights, named in its metadata
        held = meta.get("weights", "ema")
        if held != weights:
            raise CheckpointError(f"{p} holds only {held.upper() if held == 'ema' else held} weights; use "
                                  f"--weights {held} or a training checkpoint")
        prefix = ""
    else:
        arrays, meta = load_checkpoint(p)
        prefix = f"{weights}."
    if "config" not in meta:
        raise CheckpointError(f"{p} has no experiment config in its metadata; it was not written by ms_diffusion")
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}, meta


def _export_step(p: Path) -> int:
    """The step recorded in an export's header (-1 if it does not say or does not read), without its tensors."""
    import json

    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="numpy") as f:
            return int(json.loads((f.metadata() or {})[META_KEY]).get("step", -1))
    except Exception:
        return -1


def _folder_candidates(folder: Path) -> List[Path]:
    """A run folder's weights, newest step first: its step checkpoints (``checkpoints/``, else the folder
    itself) and ``model.safetensors`` (after a checkpoint of the same step)."""
    found = list_checkpoints(folder / "checkpoints") or list_checkpoints(folder)
    ranked = [(step, 0, path) for step, path in found]
    export = folder / "model.safetensors"
    if export.is_file():
        ranked.append((_export_step(export), 1, export))
    return [path for _, _, path in sorted(ranked, key=lambda item: (-item[0], item[1]))]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def read_weights(path: Union[str, Path], weights: str = "ema", log: Optional[Callable[[str], None]] = None
                 ) -> Tuple[Path, Dict[str, np.ndarray], dict]:
    """(file, {name: array} of the ``weights`` group, metadata) of a checkpoint, an export or a run folder.

    A run folder gives its newest weights that read: a newer file that does not (truncated by a full disk,
    a copy cut short) is skipped with one line through ``log`` (default: stderr) naming it and the file
    used. Weights with NaN or infinite values are refused (``CheckpointError`` naming the file).
    """
    p = Path(path)
    if not p.is_dir():
        p = resolve_checkpoint(p)
        selected, meta = _read_weights(p, weights)
    else:
        candidates = _folder_candidates(p)
        if not candidates:
            resolve_checkpoint(p)   # raises: no checkpoint in the folder
        skipped: List[Tuple[Path, CheckpointError]] = []
        for candidate in candidates:
            try:
                selected, meta = _read_weights(candidate, weights)
            except CheckpointError as err:
                skipped.append((candidate, err))
                continue
            for bad, err in skipped:
                (log or _stderr)(skipped_checkpoint_line(bad, err, candidate, meta.get("step")))
            p = candidate
            break
        else:
            raise skipped[0][1]
    _check_finite(selected, p)
    return p, selected, meta


def _check_finite(arrays: Dict[str, np.ndarray], p: Path) -> None:
    bad = {name: int(np.size(a) - np.count_nonzero(np.isfinite(a))) for name, a in arrays.items()
           if np.issubdtype(np.asarray(a).dtype, np.floating) and not np.isfinite(a).all()}
    if bad:
        total = sum(int(np.size(a)) for a in arrays.values())
        names = ", ".join(sorted(bad)[:3]) + (", ..." if len(bad) > 3 else "")
        raise CheckpointError(f"{p}: {sum(bad.values())} of its {total} weights are NaN or infinite ({len(bad)} "
                              f"tensor(s): {names}); the run diverged before this was saved. Sample an earlier "
                              f"checkpoint of the run (--ckpt RUN/checkpoints/step_N.ckpt) or retrain with a lower "
                              f"train.lr")


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


def _load_into(cell, arrays: Dict[str, np.ndarray], p: Path) -> None:
    try:
        load_arrays_into(cell, arrays)
    except ConversionError as err:
        raise CheckpointError(f"{p}: {err}") from None


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
    build_args = {}
    if cfg.diffusion["type"] == "latent" and meta.get("first_stage"):
        # the first stage's weights are in this checkpoint; only its architecture comes from the metadata
        build_args["first_stage_model"] = build_network(meta["first_stage"]["model"])
    diffusion = build_diffusion(cfg, **build_args)
    _load_into(diffusion, selected, p)
    diffusion.set_train(False)
    meta = dict(meta)
    meta["path"] = str(p)
    return cfg, diffusion, meta


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_autoencoder(path: Union[str, Path]) -> Tuple[AutoencoderKL, Dict[str, Any]]:
    """A trained autoencoder (run folder, step checkpoint or model.safetensors) as a frozen first stage.

    Returns (AutoencoderKL in eval mode with every parameter frozen, info) with info = {"path",
    "sha256" of the file, "step", "model": its config's model section}: what a latent diffusion
    records so that its own checkpoints rebuild the first stage without this file.
    """
    p, arrays, meta = read_weights(path, "online")
    cfg = config_from_dict(meta["config"])
    if not cfg.is_autoencoder:
        raise CheckpointError(f"{str(p)!r} is a {cfg.model['type']!r} checkpoint, not an autoencoder; name the run "
                              f"folder of a model trained with an autoencoder config (model.type autoencoder_kl)")
    autoencoder = build_model(cfg)
    _load_into(autoencoder, arrays, p)
    for param in autoencoder.get_parameters():
        param.requires_grad = False
    autoencoder.set_train(False)
    info = {"path": str(p), "sha256": _sha256(p), "step": meta.get("step"), "model": dict(meta["config"]["model"])}
    return autoencoder, info


def to_images(diffusion, x: ms.Tensor) -> ms.Tensor:
    """A sampler's output in model space -> images (B, C, H, W) in [0, 1] (latents are decoded)."""
    if isinstance(diffusion, LatentDiffusion):
        return diffusion.decode_to_images(x)
    return diffusion.unnormalize(x)


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
        images.append(to_images(diffusion, result.sample).asnumpy())
        if done == 0 and every:
            frames = [to_images(diffusion, ms.Tensor(x)).asnumpy() for x in result.trajectory.xs]
            frame_ts = list(result.trajectory.timesteps)
        done += b
    return Generated(np.clip(np.concatenate(images), 0.0, 1.0), frames, frame_ts)
