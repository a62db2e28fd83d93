"""Dataset splits read in bounded chunks (``DatasetStream``) or whole (``DatasetArrays``), and a fingerprint
of the data for cache keys.

Evaluation reads real images through ``DatasetStream.chunks``: only the images asked for (a subset
is chosen by index *before* anything is decoded or resized), a few megabytes at a time, so memory
does not grow with the dataset or the image size.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np

from ms_diffusion.io.hashing import update_with_file
from ms_diffusion.data import build_source, canonical_dataset_name
from ms_diffusion.data.source import ImageSource, PathLike

__all__ = ["DatasetArrays", "DatasetStream", "open_dataset", "load_dataset_arrays", "CHUNK_BYTES"]

_MAX_BATCH = 1000
#: Bytes of float32 images per chunk read from a dataset (at least one image, at most 1000).
CHUNK_BYTES = 8 << 20


@dataclass
class DatasetArrays:
    """A whole split: images float32 (N, C, H, W) in [0, 1], labels int32 (N,), and where they came from.

    ``fingerprint`` identifies the data (dataset, split, count, size and, for Fashion-MNIST, a hash
    of the IDX files), so cached statistics are recomputed when the data changes.
    """

    images: np.ndarray
    labels: np.ndarray
    dataset: str
    split: str
    origin: str
    fingerprint: str


def _fingerprint(source: ImageSource, dataset: str, split: str) -> str:
    h = hashlib.sha256()
    h.update(f"{dataset}|{split}|{source.total_samples}|{source.channels}|{source.image_size}".encode())
    folder = getattr(source, "folder", None)
    if dataset == "fashion_mnist" and folder is not None:
        from ms_diffusion.data.fashion_mnist import split_files

        for name in sorted(split_files(split)):
            update_with_file(h, Path(folder) / name)
    else:
        h.update(str(source.origin).encode())
    return h.hexdigest()[:16]


@dataclass
class DatasetStream:
    """A split of a dataset, read in chunks on demand: ``count`` images of ``shape`` (C, H, W) in [0, 1].

    ``fingerprint`` identifies the data as in ``DatasetArrays``. Nothing is read until ``chunks``.
    """

    source: ImageSource
    dataset: str
    split: str
    origin: str
    fingerprint: str

    @property
    def count(self) -> int:
        return self.source.total_samples

    @property
    def shape(self) -> Tuple[int, int, int]:
        return (self.source.channels, *self.source.image_size)

    def chunk_size(self, max_bytes: Optional[int] = None) -> int:
        """Images per chunk: as many float32 images as fit in ``max_bytes`` (default ``CHUNK_BYTES``; 1 to 1000)."""
        c, h, w = self.shape
        return int(min(_MAX_BATCH, max(1, (CHUNK_BYTES if max_bytes is None else max_bytes) // (4 * c * h * w))))

    def batches(self, indices: Optional[Sequence[int]] = None, max_bytes: Optional[int] = None
                ) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """(images float32 (B, C, H, W), labels int32 (B,)) of ``indices`` (default: all, in file order), in order."""
        order = np.arange(self.count) if indices is None else np.asarray(indices, dtype=np.int64)
        return self.source.images_at(order, self.chunk_size(max_bytes))

    def chunks(self, indices: Optional[Sequence[int]] = None, max_bytes: Optional[int] = None
               ) -> Iterator[np.ndarray]:
        """Images float32 (B, C, H, W) in [0, 1] of ``indices`` (default: all, in file order), in order,
        at most ``max_bytes`` (or one image) per chunk."""
        for images, _ in self.batches(indices, max_bytes):
            yield images


def open_dataset(dataset: str, split: str = "train", *, data_dir: Optional[PathLike] = None,
                 image_size: Optional[int] = None, channels: Optional[int] = None) -> DatasetStream:
    """``split`` of ``dataset`` (any name ``build_source`` accepts) at ``image_size`` / ``channels``, unread.

    Raises the data module's DataNotFoundError (a clear message with the fixes) when the data is missing.
    """
    kind = canonical_dataset_name(dataset)
    source = build_source(kind, data_dir=data_dir, split=split, image_size=image_size, channels=channels,
                          random_flip=False, num_workers=2)
    return DatasetStream(source=source, dataset=kind, split=split, origin=str(source.origin),
                         fingerprint=_fingerprint(source, kind, split))


def load_dataset_arrays(dataset: str, split: str = "train", *, data_dir: Optional[PathLike] = None,
                        image_size: Optional[int] = None, channels: Optional[int] = None) -> DatasetArrays:
    """Read every image of ``split`` of ``dataset`` (any name ``build_source`` accepts) into memory.

    The whole of Fashion-MNIST train (60,000 images, 188 MB as float32) takes ~3 s. Raises the data
    module's DataNotFoundError (a clear message with the fixes) when the data is missing. Evaluation
    uses ``open_dataset`` instead, which reads in chunks.
    """
    stream = open_dataset(dataset, split, data_dir=data_dir, image_size=image_size, channels=channels)
    n = stream.count
    images = np.empty((n, *stream.shape), dtype=np.float32)
    labels = np.empty(n, dtype=np.int32)
    done = 0
    for x, y in stream.batches():
        images[done:done + len(x)] = x
        labels[done:done + len(x)] = y
        done += len(x)
    return DatasetArrays(images=images, labels=labels, dataset=stream.dataset, split=split, origin=stream.origin,
                         fingerprint=stream.fingerprint)
