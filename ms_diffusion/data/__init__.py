"""Datasets for training: Fashion-MNIST, image folders, CIFAR-10, as deterministic, resumable, sharded sources.

``build_source(name, ...)`` is the one entry point; every source is an ``ImageSource`` whose
``epoch(e, batch_size, start_batch)`` yields images float32 (B, C, H, W) in [0, 1] and labels
int32 (B,). See ``ms_diffusion.data.source`` for how exact mid-epoch resume is guaranteed.
"""
from __future__ import annotations

import difflib
from typing import Optional

from ms_diffusion.data.cifar10 import Cifar10Source, locate_cifar10
from ms_diffusion.data.fashion_mnist import FashionMnistSource, locate_fashion_mnist
from ms_diffusion.data.image_folder import ImageFolderSource, scan_image_folder
from ms_diffusion.data.source import (BadDataError, DataError, DataNotFoundError, ImageSource, PathLike,
                                      resolve_workers)
from ms_diffusion.data.transforms import SizeLike

__all__ = ["build_source", "DATASET_NAMES", "ImageSource", "FashionMnistSource", "ImageFolderSource",
           "Cifar10Source", "DataError", "DataNotFoundError", "BadDataError", "locate_fashion_mnist",
           "locate_cifar10", "scan_image_folder", "resolve_workers"]

#: Canonical dataset names accepted by ``build_source``.
DATASET_NAMES = ("fashion_mnist", "image_folder", "cifar10")
_ALIASES = {"fashion_mnist": "fashion_mnist", "fashion-mnist": "fashion_mnist", "fashionmnist": "fashion_mnist",
            "image_folder": "image_folder", "image-folder": "image_folder", "imagefolder": "image_folder",
            "folder": "image_folder", "cifar10": "cifar10", "cifar-10": "cifar10", "cifar_10": "cifar10"}


def canonical_dataset_name(name: str) -> str:
    """``"Fashion-MNIST"`` -> ``"fashion_mnist"``; a ValueError suggesting the closest name otherwise."""
    key = str(name).strip().lower()
    if key in _ALIASES:
        return _ALIASES[key]
    close = difflib.get_close_matches(key, list(_ALIASES), n=1)
    hint = f" Did you mean {_ALIASES[close[0]]!r}?" if close else ""
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}.{hint}")


def build_source(name: str, *, data_dir: Optional[PathLike] = None, image_size: Optional[SizeLike] = None,
                 channels: Optional[int] = None, split: str = "train", random_flip: bool = False, seed: int = 0,
                 num_shards: int = 1, shard_id: int = 0, num_workers: Optional[int] = None, skip_bad: bool = False,
                 download: bool = True, url: Optional[str] = None) -> ImageSource:
    """The ``ImageSource`` for dataset ``name`` ("fashion_mnist", "image_folder" or "cifar10").

    ``image_size`` (int or (H, W)) and ``channels`` (1 or 3) default to the dataset's own (28/1,
    32/3; 64/3 for folders). ``split`` ("train", "test", "all") applies to Fashion-MNIST and CIFAR-10;
    an image folder is used whole. ``skip_bad`` applies to image folders; ``download``/``url`` to
    Fashion-MNIST. ``seed`` fixes the per-epoch order and flips; ``num_shards``/``shard_id`` select
    this rank's equal share; ``num_workers`` (default 4) is clamped to the core count.
    """
    kind = canonical_dataset_name(name)
    common = dict(image_size=image_size, channels=channels, random_flip=random_flip, seed=seed,
                  num_shards=num_shards, shard_id=shard_id, num_workers=num_workers)
    if kind == "fashion_mnist":
        return FashionMnistSource(data_dir, split=split, download=download, url=url, **common)
    if kind == "cifar10":
        return Cifar10Source(data_dir, split=split, **common)
    if data_dir is None:
        raise DataNotFoundError("the image_folder dataset needs a folder: pass --data-dir DIR (a folder of images, "
                                "optionally one subfolder per class)")
    return ImageFolderSource(data_dir, skip_bad=skip_bad, **common)
