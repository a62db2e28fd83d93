"""Per-sample image transforms for the MindSpore pipelines, and the host-side horizontal flip.

Every source ends its per-sample transforms with ``vision.ToTensor``: image (C, H, W) float32 in
[0, 1]. Resizing follows one policy for all sources: the shorter side goes to ``max(H, W)``, then a
center crop of (H, W). Two flavours of the same ops exist because the inputs differ:

* numpy HWC uint8 images straight from MindSpore's C++ readers (Fashion-MNIST, CIFAR-10) use the
  OpenCV-backed ops (``Inter.AREA`` to shrink, ``Inter.BICUBIC`` to enlarge);
* encoded files from image folders are decoded by PIL (``DecodeImage``, a map op in the
  pipeline, like ``vision.Decode(to_pil=True)`` but without its 16-bit clipping) and use the PIL
  ops (PIL's bicubic resize anti-aliases when shrinking). MindSpore's own C++ decoder
  (``vision.Decode()``) kills the process with SIGFPE on some truncated or damaged JPEGs (measured
  with MindSpore 2.10), which no up-front check can make safe; PIL raises a Python error instead,
  and the folder scan validates every file with the very decoder the pipeline uses.
"""
from __future__ import annotations

import io
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

import mindspore.dataset.vision as vision
from mindspore.dataset.vision import Inter

Size = Tuple[int, int]
SizeLike = Union[int, Sequence[int]]

__all__ = ["Size", "SizeLike", "as_size", "as_channels", "resize_crop_ops", "array_channel_ops", "DecodeImage",
           "flip_batch"]


def as_size(image_size: SizeLike) -> Size:
    """``64`` or ``(64, 64)`` or ``[48, 64]`` -> ``(H, W)`` of positive ints."""
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        size = (int(image_size), int(image_size))
    elif isinstance(image_size, (tuple, list)) and len(image_size) == 2 and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in image_size):
        size = (int(image_size[0]), int(image_size[1]))
    else:
        raise ValueError(f"image_size must be an int or a pair (height, width) of ints, got {image_size!r}")
    if min(size) < 1:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return size


def as_channels(channels: int) -> int:
    """Validate a channel count: 1 (grayscale) or 3 (RGB)."""
    if channels not in (1, 3) or isinstance(channels, bool):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    return int(channels)


def resize_crop_ops(src_hw: Optional[Size], target: Size, *, pil: bool) -> List:
    """Ops that resize the shorter side to ``max(target)`` and center-crop to ``target`` (H, W).

    ``src_hw`` is the fixed input size when all images share one (then an exact match needs no op
    and the interpolation is chosen by direction), or None for images of any size (PIL path).
    """
    if src_hw is not None and tuple(src_hw) == tuple(target):
        return []
    side = max(target)
    if pil:
        interp = Inter.BICUBIC
    else:
        shrinking = src_hw is not None and min(src_hw) > side
        interp = Inter.AREA if shrinking else Inter.BICUBIC
    ops = [vision.Resize(side, interp)]
    if src_hw is None or target[0] != target[1] or src_hw[0] != src_hw[1]:
        ops.append(vision.CenterCrop(target))
    return ops


def array_channel_ops(src_channels: int, channels: int) -> List:
    """Ops converting a numpy HWC uint8 image from ``src_channels`` to ``channels`` (1 or 3)."""
    if src_channels == channels:
        return []
    if src_channels == 1 and channels == 3:
        return [vision.ConvertColor(vision.ConvertMode.COLOR_GRAY2RGB)]
    if src_channels == 3 and channels == 1:
        return [vision.ConvertColor(vision.ConvertMode.COLOR_RGB2GRAY)]
    raise ValueError(f"cannot convert {src_channels} channels to {channels}")


class DecodeImage:
    """Encoded image file (uint8 bytes (n,)) -> PIL image in mode "L" (channels=1) or "RGB" (channels=3).

    The decoder of the image-folder pipeline and of its up-front scan (the same code, so a file that
    passes the scan decodes in training). PIL decodes it; alpha is dropped, palettes expanded, and
    16/32-bit integer images are scaled to 8 bits -- ``vision.Decode(to_pil=True)`` would clip them
    to 255, as its PIL ``convert("RGB")`` does. Raises PIL's errors on damaged files.
    """

    def __init__(self, channels: int):
        self.channels = as_channels(channels)
        self.mode = "L" if self.channels == 1 else "RGB"

    def __call__(self, raw: np.ndarray) -> Image.Image:
        img = Image.open(io.BytesIO(np.asarray(raw, dtype=np.uint8).tobytes()))
        img.load()
        if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
            wide = np.asarray(img, dtype=np.int64)
            shift = 8 if img.mode.startswith("I;16") or wide.max(initial=0) < 65536 else 24
            img = Image.fromarray((np.clip(wide, 0, None) >> shift).astype(np.uint8), "L")
        elif img.mode == "F":
            img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L")
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"DecodeImage(channels={self.channels})"


def flip_batch(images: np.ndarray, flip: np.ndarray) -> np.ndarray:
    """Mirror the width axis of ``images`` (B, C, H, W) where ``flip`` (B,) bool is set, in place."""
    if flip.any():
        images[flip] = images[flip][..., ::-1]
    return images
