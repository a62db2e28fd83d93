"""Datasets for training: Fashion-MNIST, image folders, CIFAR-10, as deterministic, resumable, sharded sources.

Every dataset is registered once, in ``DATASETS`` below, under its name and aliases; its
constructor's signature is the schema of a config's ``data:`` section (``image_size``, ``channels``,
``seed`` and the shard are filled in by code). A new dataset is one module with an ``ImageSource``
subclass and one ``DATASETS.register`` line. Every source's ``epoch(e, batch_size, start_batch)``
yields images float32 (B, C, H, W) in [0, 1] and labels int32 (B,); see ``ms_diffusion.data.source``
for how exact mid-epoch resume is guaranteed.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Any, Optional

from ms_diffusion.data.cifar10 import Cifar10Source, locate_cifar10
from ms_diffusion.data.fashion_mnist import FashionMnistSource, locate_fashion_mnist
from ms_diffusion.data.fashion_mnist_captions import FashionMnistCaptionsSource
from ms_diffusion.data.image_folder import ImageFolderSource, scan_image_folder
from ms_diffusion.data.source import (BadDataError, DataError, DataNotFoundError, ImageSource, PathLike,
                                      resolve_workers)
from ms_diffusion.registry import ConfigError, Registry

__all__ = ["DATASETS", "build_source", "canonical_dataset_name", "DATASET_NAMES", "ImageSource", "FashionMnistSource",
           "ImageFolderSource", "Cifar10Source", "FashionMnistCaptionsSource", "DataError", "DataNotFoundError",
           "BadDataError", "locate_fashion_mnist", "locate_cifar10", "scan_image_folder", "resolve_workers"]

#: arguments of a dataset constructor that code fills in from the model and the run, never a config
CODE_FILLED = ("image_size", "channels", "seed", "num_shards", "shard_id")

DATASETS = Registry("data", key="name", build_only=CODE_FILLED)
DATASETS.register("fashion_mnist", FashionMnistSource, aliases=("fashion-mnist", "fashionmnist"))
DATASETS.register("image_folder", ImageFolderSource, aliases=("image-folder", "imagefolder", "folder"))
DATASETS.register("cifar10", Cifar10Source, aliases=("cifar-10", "cifar_10"))
DATASETS.register("fashion_mnist_captions", FashionMnistCaptionsSource, aliases=("fashion-mnist-captions",))

#: Canonical dataset names accepted by ``build_source``.
DATASET_NAMES = DATASETS.names


def canonical_dataset_name(name: str) -> str:
    """``"Fashion-MNIST"`` -> ``"fashion_mnist"``; a ValueError suggesting the closest name otherwise."""
    key = str(name).strip().lower()
    try:
        return DATASETS.canonical(key)
    except ConfigError:
        match = difflib.get_close_matches(key, DATASETS.aliases, n=1)
        hint = f" Did you mean {DATASETS.canonical(match[0])!r}?" if match else ""
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}.{hint}") from None


def build_source(name: str, *, data_dir: Optional[PathLike] = None, **options: Any) -> ImageSource:
    """The ``ImageSource`` for dataset ``name`` (a registered name or alias: "fashion_mnist", "image_folder",
    "cifar10").

    ``options`` are the dataset's constructor arguments: ``image_size`` (int or (H, W)) and ``channels``
    (1 or 3) default to the dataset's own (28/1, 32/3; 64/3 for folders); ``split`` ("train", "test",
    "all") for Fashion-MNIST and CIFAR-10; ``skip_bad`` for image folders; ``download``/``url`` for
    Fashion-MNIST; ``random_flip``, ``seed`` (per-epoch order and flips), ``num_shards``/``shard_id``
    (this rank's equal share) and ``num_workers`` (default 4, clamped to the core count) for all. An
    option that another dataset takes but this one does not (``split`` for a folder) is ignored; one that
    no dataset takes is a TypeError.
    """
    kind = canonical_dataset_name(name)
    known = set()
    for entry in DATASETS.names:
        known.update(inspect.signature(DATASETS[entry]).parameters)
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"build_source() got unknown option(s) {unknown}")
    own = inspect.signature(DATASETS[kind]).parameters
    return DATASETS[kind](data_dir, **{k: v for k, v in options.items() if k in own})
