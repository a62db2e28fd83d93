"""Image grids, GIFs and loss plots from numpy arrays, and reading one image (no MindSpore)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Union

import numpy as np
from PIL import Image

__all__ = ["to_uint8", "make_grid", "save_grid", "save_gif", "plot_losses", "load_image"]

PathLike = Union[str, os.PathLike]


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(N, C, H, W) floats in [0, 1] -> (N, H, W, C) uint8 (values outside [0, 1] are clipped)."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {images.shape}")
    return (np.clip(images, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1)


def load_image(path: PathLike, mode: str = "RGB", size: Optional[Sequence[int]] = None) -> np.ndarray:
    """An image file -> (1, C, H, W) float32 in [0, 1]; ``mode`` "RGB" (C = 3) or "L" (C = 1, e.g. a mask);
    ``size`` (H, W): resized (Lanczos; nearest for "L", so a mask stays a mask)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image {str(p)!r} does not exist")
    try:
        with Image.open(p) as img:
            img = img.convert(mode)
            if size is not None and tuple(img.size) != (int(size[1]), int(size[0])):
                img = img.resize((int(size[1]), int(size[0])), Image.NEAREST if mode == "L" else Image.LANCZOS)
            a = np.asarray(img, dtype=np.float32) / 255.0
    except OSError as e:
        raise ValueError(f"cannot read image {str(p)!r}: {e}") from None
    a = a[:, :, None] if a.ndim == 2 else a
    return a.transpose(2, 0, 1)[None]


def make_grid(images: np.ndarray, nrow: Optional[int] = None, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile (N, C, H, W) images in [0, 1] into one (rows*H', cols*W', C) uint8 picture."""
    pix = to_uint8(images)
    n, h, w, c = pix.shape
    cols = nrow or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, c), pad_value, np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        y, x = padding + r * (h + padding), padding + q * (w + padding)
        grid[y:y + h, x:x + w] = pix[i]
    return grid


def _pil(grid: np.ndarray) -> Image.Image:
    return Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)


def save_grid(images: np.ndarray, path: PathLike, nrow: Optional[int] = None, scale: int = 1) -> Path:
    """Write a PNG grid of (N, C, H, W) images in [0, 1]; ``scale`` enlarges small images (nearest)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = _pil(make_grid(images, nrow))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)
    return path


def save_gif(frames: Sequence[np.ndarray], path: PathLike, nrow: Optional[int] = None, duration_ms: int = 40,
             hold_last_ms: int = 1500, scale: int = 1) -> Path:
    """Animated GIF of a denoising trajectory: each frame (N, C, H, W) in [0, 1] becomes one grid."""
    if not frames:
        raise ValueError("save_gif needs at least one frame")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pics = []
    for frame in frames:
        img = _pil(make_grid(frame, nrow))
        if scale > 1:
            img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
        pics.append(img.convert("P") if img.mode != "L" else img)
    durations = [duration_ms] * (len(pics) - 1) + [hold_last_ms]
    pics[0].save(path, save_all=True, append_images=pics[1:], duration=durations, loop=0)
    return path


def plot_losses(steps: Sequence[int], losses: Sequence[float], path: PathLike, title: str = "training loss") -> Path:
    """Loss curve (raw and moving average, log scale) as a PNG.

    Drawn on a bare Agg ``Figure``, not pyplot, so the caller's matplotlib backend (a notebook's
    inline one, say) is left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    steps, losses = np.asarray(steps), np.asarray(losses, dtype=np.float64)
    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(steps, losses, lw=0.6, alpha=0.4, label="loss")
    if len(losses) >= 5:
        k = max(len(losses) // 20, 2)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, lw=1.5, label=f"mean of {k}")
    if np.all(losses > 0):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path
