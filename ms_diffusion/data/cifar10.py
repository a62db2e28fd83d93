"""CIFAR-10, binary version, read by ``mindspore.dataset.Cifar10Dataset``.

The folder is ``data_dir`` (or ``$MS_DIFFUSION_DATA/cifar-10``), or a folder up to two levels below
it, holding ``data_batch_1.bin`` ... ``data_batch_5.bin`` and ``test_batch.bin`` -- what
``cifar-10-binary.tar.gz`` unpacks to (``cifar-10-batches-bin/``). Nothing is downloaded.
MindSpore reads exactly 10,000 records of 3,073 bytes (label, then 3x32x32 planes) from every file,
so file sizes are checked up front and a short file is reported by name.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import mindspore as ms
import mindspore.dataset as ds
import mindspore.dataset.transforms as dtrans
import mindspore.dataset.vision as vision

from ms_diffusion.data.source import BadDataError, DataNotFoundError, ImageSource, PathLike, data_root
from ms_diffusion.data.transforms import SizeLike, array_channel_ops, as_channels, as_size, resize_crop_ops

__all__ = ["Cifar10Source", "locate_cifar10", "default_cifar10_dir", "CIFAR10_CLASSES", "CIFAR10_SPLITS",
           "CIFAR10_URL"]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_SPLITS = ("train", "test", "all")
CIFAR10_DIRNAME = "cifar-10"
RECORDS_PER_FILE = 10_000
RECORD_BYTES = 1 + 3 * 32 * 32
_SIDE = 32
_SEARCH_DEPTH = 2


def default_cifar10_dir() -> Path:
    """``$MS_DIFFUSION_DATA/cifar-10``, or ``./data/cifar-10`` when the variable is unset."""
    return Path(data_root()) / CIFAR10_DIRNAME


def _split_files(folder: Path, split: str) -> List[Path]:
    """The .bin files MindSpore reads for ``split`` in ``folder``, in its (sorted) order."""
    key = {"train": "data_batch", "test": "test_batch", "all": "batch"}[split]
    return sorted(p for p in folder.glob("*.bin") if key in p.name and p.is_file())


def _find(root: Path, split: str) -> Optional[Path]:
    level = [root] if root.is_dir() else []
    for _ in range(_SEARCH_DEPTH + 1):
        for folder in level:
            if _split_files(folder, split):
                return folder
        level = [sub for folder in level for sub in sorted(folder.iterdir())
                 if sub.is_dir() and not sub.name.startswith(".")]
    return None


def locate_cifar10(data_dir: Optional[PathLike] = None, split: str = "train") -> Tuple[Path, List[Path]]:
    """The folder with CIFAR-10 binary files for ``split`` and those files (sizes checked)."""
    if split not in CIFAR10_SPLITS:
        raise ValueError(f"CIFAR-10 split must be one of {CIFAR10_SPLITS}, got {split!r}")
    root = Path(data_dir).expanduser() if data_dir is not None else default_cifar10_dir()
    folder = _find(root, split)
    if folder is None:
        python_version = root.is_dir() and any(p.name == "data_batch_1" for p in root.rglob("data_batch_1"))
        hint = (" It holds the Python (pickle) version; MindSpore reads the binary version." if python_version
                else "")
        where = "--data-dir" if data_dir is not None else "the default data folder"
        raise DataNotFoundError(
            f"CIFAR-10 {split} data not found in {root} ({where}, searched {_SEARCH_DEPTH} levels down).{hint} "
            f"Download the binary version from {CIFAR10_URL}, unpack it, and pass --data-dir pointing at "
            f"cifar-10-batches-bin (or put it under {default_cifar10_dir()}).")
    files = _split_files(folder, split)
    for path in files:
        size = path.stat().st_size
        if size != RECORDS_PER_FILE * RECORD_BYTES:
            raise BadDataError(f"{path} has {size:,} bytes; a CIFAR-10 binary batch file has "
                               f"{RECORDS_PER_FILE * RECORD_BYTES:,} ({RECORDS_PER_FILE:,} records of {RECORD_BYTES} "
                               f"bytes), which MindSpore's Cifar10Dataset requires. Replace it with the file from "
                               f"{CIFAR10_URL}, or move it out of {folder}.")
    return folder, files


def _class_names(folder: Path) -> Sequence[str]:
    meta = folder / "batches.meta.txt"
    if meta.is_file():
        names = [line.strip() for line in meta.read_text(errors="replace").splitlines() if line.strip()]
        if len(names) == len(CIFAR10_CLASSES):
            return names
    return CIFAR10_CLASSES


class Cifar10Source(ImageSource):
    """CIFAR-10 (10 classes, native 3x32x32) read by ``mindspore.dataset.Cifar10Dataset``.

    Other ``image_size``/``channels`` come from resizing (shorter side, center crop) and RGB->gray
    conversion in the pipeline. Yields images float32 (B, C, H, W) in [0, 1] and labels int32 (B,).
    """

    def __init__(self, data_dir: Optional[PathLike] = None, *, split: str = "train",
                 image_size: Optional[SizeLike] = None, channels: Optional[int] = None, random_flip: bool = False,
                 seed: int = 0, num_shards: int = 1, shard_id: int = 0, num_workers: Optional[int] = None):
        folder, files = locate_cifar10(data_dir, split)
        self.folder, self.split = folder, split
        self.title = f"CIFAR-10 {split}"
        super().__init__(total_samples=RECORDS_PER_FILE * len(files),
                         channels=as_channels(3 if channels is None else channels),
                         image_size=as_size(_SIDE if image_size is None else image_size),
                         num_classes=len(CIFAR10_CLASSES), class_names=_class_names(folder),
                         origin=f"{folder} ({', '.join(p.name for p in files)})", random_flip=random_flip,
                         seed=seed, num_shards=num_shards, shard_id=shard_id, num_workers=num_workers)

    def _pipeline(self, sampler: ds.Sampler) -> ds.Dataset:
        data = ds.Cifar10Dataset(str(self.folder), usage=self.split, sampler=sampler,
                                 num_parallel_workers=self.num_workers)
        image_ops = (resize_crop_ops((_SIDE, _SIDE), self.image_size, pil=False)
                     + array_channel_ops(3, self.channels) + [vision.ToTensor()])
        data = data.map(image_ops, input_columns="image", num_parallel_workers=self.num_workers)
        return data.map(dtrans.TypeCast(ms.int32), input_columns="label", num_parallel_workers=1)
