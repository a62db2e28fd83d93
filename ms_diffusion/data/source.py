"""``ImageSource``: a dataset the trainer can iterate deterministically, shard, and resume mid-epoch.

The order of an epoch is decided on the host, before MindSpore sees anything:

1. ``perm = permutation(N)`` from ``SeedSequence([seed, epoch, 0])`` -- the same on every rank;
2. ``perm[: N // num_shards * num_shards][shard_id::num_shards]`` -- equal, disjoint shards whose
   union is all but at most ``num_shards - 1`` samples (a different few each epoch);
3. the batches ``start_batch ..`` of that list go to the MindSpore pipeline through
   ``SubsetSampler``, which yields exactly the given order (with parallel workers too; the tests
   check it against the raw files);
4. random horizontal flips are a fixed function of ``(seed, epoch, sample index)``
   (``SeedSequence([seed, epoch, 1])``) applied to each batch on the host.

So ``epoch(e, B, start_batch=k)`` yields exactly the batches ``k, k+1, ...`` of ``epoch(e, B)``,
bit for bit, whatever happened before: nothing depends on RNG state consumed by earlier batches.
"""
from __future__ import annotations

import abc
import os
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

import mindspore.dataset as ds

from ms_diffusion.data.transforms import Size, flip_batch

__all__ = ["ImageSource", "PathLike", "DataError", "DataNotFoundError", "BadDataError", "resolve_workers",
           "DEFAULT_NUM_WORKERS", "DATA_ROOT_ENV", "DEFAULT_DATA_ROOT", "data_root"]

#: Environment variable naming the folder that holds the default per-dataset data folders.
DATA_ROOT_ENV = "MS_DIFFUSION_DATA"
#: The data root when ``MS_DIFFUSION_DATA`` is not set (relative to the working directory).
DEFAULT_DATA_ROOT = "data"
#: Pipeline workers when the caller does not say (clamped to the core count).
DEFAULT_NUM_WORKERS = 4

PathLike = Union[str, "os.PathLike[str]"]

_PERMUTATION_STREAM = 0
_FLIP_STREAM = 1


class DataError(ValueError):
    """A problem with the user's data that the user can fix; the message says how."""


class DataNotFoundError(DataError):
    """The dataset could not be found (or fetched); the message lists where we looked and the fixes."""


class BadDataError(DataError):
    """Data files that cannot be used (corrupt, truncated, too small); the message names them and the fix."""


def data_root() -> str:
    """The folder holding default data folders: ``$MS_DIFFUSION_DATA`` if set, else ``./data``."""
    return os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT


def resolve_workers(num_workers: Optional[int]) -> int:
    """Pipeline parallelism: ``num_workers`` (default 4) clamped to [1, os.cpu_count()].

    MindSpore raises a ValueError for ``num_parallel_workers`` above the core count.
    """
    cores = os.cpu_count() or 1
    wanted = DEFAULT_NUM_WORKERS if num_workers is None else int(num_workers)
    return max(1, min(wanted, cores))


class ImageSource(abc.ABC):
    """A dataset of images and class labels, iterated in deterministic, resumable, sharded epochs.

    ``epoch()`` yields ``(images, labels)``: images float32 (B, C, H, W) in [0, 1], labels int32 (B,)
    (class ids, all 0 when the data has no classes); ``epoch(..., captions=True)`` adds each image's
    caption (a list of B str) for sources that have captions (``has_captions``). Attributes:
    ``num_samples`` (per shard, per epoch), ``num_classes`` (None without labels), ``class_names``, ``channels``, ``image_size``
    (H, W), ``total_samples`` (before sharding), ``origin`` (where the data came from).
    """

    #: Human-readable dataset name, e.g. "Fashion-MNIST".
    title: str = "images"

    def __init__(self, *, total_samples: int, channels: int, image_size: Size, num_classes: Optional[int],
                 class_names: Optional[Sequence[str]], origin: str, random_flip: bool, seed: int,
                 num_shards: int, shard_id: int, num_workers: Optional[int], notes: Sequence[str] = ()):
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if num_shards < 1 or not 0 <= shard_id < num_shards:
            raise ValueError(f"need num_shards >= 1 and 0 <= shard_id < num_shards, got shard_id={shard_id}, "
                             f"num_shards={num_shards}")
        if total_samples < num_shards:
            raise DataError(f"{self.title}: {total_samples} image(s) cannot be split over {num_shards} shards "
                            f"(devices); use more data or fewer devices")
        self.total_samples = int(total_samples)
        self.channels = int(channels)
        self.image_size: Size = (int(image_size[0]), int(image_size[1]))
        self.num_classes = num_classes
        self.class_names: Optional[List[str]] = list(class_names) if class_names is not None else None
        self.origin = origin
        self.random_flip = bool(random_flip)
        self.seed = int(seed)
        self.num_shards = int(num_shards)
        self.shard_id = int(shard_id)
        self.num_workers = resolve_workers(num_workers)
        self.notes = list(notes)
        self.num_samples = self.total_samples // self.num_shards
        self._failure: Optional[DataError] = None  # set by a pipeline's Python source that hit bad data

    # --- the deterministic plan --------------------------------------------------------------

    def _rng(self, epoch: int, stream: int) -> np.random.Generator:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        return np.random.default_rng(np.random.SeedSequence([self.seed, int(epoch), stream]))

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This shard's sample indices for ``epoch``, in iteration order: int64 (num_samples,)."""
        perm = self._rng(epoch, _PERMUTATION_STREAM).permutation(self.total_samples)
        return perm[: self.num_samples * self.num_shards][self.shard_id::self.num_shards]

    def flip_mask(self, epoch: int) -> np.ndarray:
        """Whether each sample (by index, all shards) is mirrored in ``epoch``: bool (total_samples,).

        All False when ``random_flip`` is off.
        """
        if not self.random_flip:
            return np.zeros(self.total_samples, dtype=bool)
        return self._rng(epoch, _FLIP_STREAM).random(self.total_samples) < 0.5

    def batches_per_epoch(self, batch_size: int) -> int:
        """Full batches per epoch on this shard (the last partial batch is dropped)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        n = self.num_samples // int(batch_size)
        if n == 0:
            shard = f" per shard ({self.num_shards} shards)" if self.num_shards > 1 else ""
            raise DataError(f"{self.title}: batch size {batch_size} is larger than the {self.num_samples} images"
                            f"{shard}; use a smaller batch size or more data")
        return n

    # --- captions (text-to-image training) ----------------------------------------------------

    #: per-sample captions, by sample index over all shards; None when the source has none. Sources whose
    #: captions follow from each batch (e.g. from its labels) override ``has_captions`` and ``batch_captions``.
    captions: Optional[List[str]] = None

    @property
    def has_captions(self) -> bool:
        return self.captions is not None

    def require_captions(self) -> None:
        """A DataError saying what to do when this source has no captions (a text-conditional model needs them)."""
        if not self.has_captions:
            raise DataError(f"{self.title} has no captions, but the model is text-conditional; train it on a "
                            f"captioned dataset: an image folder with metadata.jsonl (file_name, text) or a NAME.txt "
                            f"beside each image, or data.name fashion_mnist_captions")

    def batch_captions(self, indices: np.ndarray, labels: np.ndarray) -> List[str]:
        """The captions of the samples ``indices`` (int64 (B,)), whose labels are ``labels`` (int32 (B,))."""
        return [self.captions[int(i)] for i in indices]

    def example_prompts(self, num: int) -> List[str]:
        """Prompts for a text-conditional run's grids and evaluations: the distinct non-empty captions of the
        first training images, at most ``num`` (a source with a known prompt set returns that instead)."""
        self.require_captions()
        _, _, captions = next(iter(self.epoch(0, max(1, min(num, self.num_samples)), captions=True)))
        return list(dict.fromkeys(c for c in captions if c)) or [""]

    def _transform_batch(self, images: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """Per-sample changes every reader sees (after the flips), in place; ``indices`` (B,) by sample index."""
        return images

    # --- iteration ----------------------------------------------------------------------------

    def epoch(self, epoch: int, batch_size: int, start_batch: int = 0, captions: bool = False) -> Iterator[tuple]:
        """Batches ``start_batch, start_batch + 1, ...`` of ``epoch`` on this shard.

        Yields ``(images, labels)``: float32 (B, C, H, W) in [0, 1] and int32 (B,). Exactly the
        same arrays as the corresponding batches of ``epoch(epoch, batch_size)``. With ``captions``:
        ``(images, labels, captions)``, captions a list of B str (a DataError if the source has none).
        """
        if captions:
            self.require_captions()
        n_batches = self.batches_per_epoch(batch_size)
        if not 0 <= start_batch <= n_batches:
            raise ValueError(f"start_batch must be in [0, {n_batches}] for batch size {batch_size}, "
                             f"got {start_batch}")
        order = self.epoch_indices(epoch)[start_batch * batch_size: n_batches * batch_size]
        flips = self.flip_mask(epoch)[order]
        batches = self._iterate(order, flips, batch_size)
        if captions:
            return ((images, labels, self.batch_captions(indices, labels)) for images, labels, indices in batches)
        return (batch[:2] for batch in batches)

    def _iterate(self, order: np.ndarray, flips: np.ndarray, batch_size: int
                 ) -> Iterator[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(images, labels, sample indices) of each batch of ``order``."""
        expected = len(order) // batch_size
        if expected == 0:
            return
        pipeline = self._pipeline(ds.SubsetSampler(order.tolist())).batch(
            batch_size, drop_remainder=True, num_parallel_workers=1)
        iterator = pipeline.create_tuple_iterator(num_epochs=1, output_numpy=True)
        produced = 0
        self._failure = None
        try:
            for images, labels in iterator:
                images = np.array(images, dtype=np.float32, copy=True)
                labels = np.asarray(labels).astype(np.int32, copy=False)
                part = slice(produced * batch_size, (produced + 1) * batch_size)
                flip_batch(images, flips[part])
                self._transform_batch(images, order[part])
                produced += 1
                yield images, labels, order[part]
        except RuntimeError as exc:  # MindSpore wraps errors of Python code in the pipeline: unwrap ours
            if self._failure is not None:
                raise self._failure from exc
            raise
        finally:
            iterator.stop()
        if produced != expected:
            raise RuntimeError(f"{self.title}: the pipeline produced {produced} batches instead of {expected}")

    def images_at(self, indices: Sequence[int], batch_size: int = 32, prefetch: Optional[int] = 2
                  ) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """The samples ``indices`` (of all shards) in that order, unflipped, ``batch_size`` at a time (the last
        batch smaller): ``(images, labels)`` as ``epoch()`` yields them. For reading (part of) a dataset
        with bounded memory: ``prefetch`` batches are queued per pipeline stage (MindSpore's default, 16,
        holds hundreds of large images; None keeps it).
        """
        order = np.asarray(indices, dtype=np.int64).reshape(-1)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        full = len(order) // batch_size * batch_size
        for part, size in ((order[:full], batch_size), (order[full:], len(order) - full)):
            if size == 0:
                continue
            batches = self._iterate(part, np.zeros(len(part), dtype=bool), size)
            previous = ds.config.get_prefetch_size()
            if prefetch:
                ds.config.set_prefetch_size(int(prefetch))   # read when the pipeline starts, at the first batch
            try:
                first = next(batches, None)
            finally:
                ds.config.set_prefetch_size(previous)
            if first is not None:
                yield first[:2]
                yield from (batch[:2] for batch in batches)

    def _report_failure(self, error: DataError) -> None:
        """Called by Python code inside the pipeline before it raises, so ``epoch()`` can re-raise ``error``."""
        self._failure = error

    @abc.abstractmethod
    def _pipeline(self, sampler: ds.Sampler) -> ds.Dataset:
        """A MindSpore dataset over the sampled indices with columns ``image`` float32 (C, H, W) in [0, 1]
        and ``label`` int32, in exactly the sampler's order."""

    # --- reporting ----------------------------------------------------------------------------

    def describe(self) -> str:
        """One paragraph for the training log: what was loaded, from where, how it is fed."""
        h, w = self.image_size
        classes = (f"{self.num_classes} classes" if self.num_classes is not None else "no class labels")
        if self.class_names and self.num_classes is not None and self.num_classes <= 10:
            classes += " (" + ", ".join(self.class_names) + ")"
        text = f"{self.title}: {self.total_samples:,} images, {classes}, {self.channels}x{h}x{w}"
        if self.num_shards > 1:
            text += f", shard {self.shard_id} of {self.num_shards}: {self.num_samples:,} images per epoch"
        text += f", random flip {'on' if self.random_flip else 'off'}, from {self.origin}"
        for note in self.notes:
            text += f"; {note}"
        return text

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"
