"""Reference features of real data, cached on disk per dataset, split, data and feature extractor.

Cache folder: ``$MS_DIFFUSION_CACHE/metrics`` if that variable is set, else
``~/.cache/ms_diffusion/metrics``. One ``.npz`` per reference holds the real features (N, D)
float32, their mean and covariance (float64) and a JSON description. Its file name is

    ref-<dataset>-<split>-<data fingerprint>-<extractor name>-<weights sha256[:16]>-<count>-v1.npz

so new weights (a different SHA-256), different data files or a different image count never reuse
old statistics. Files are written under a temporary name and renamed (atomic); delete the folder
to clear the cache. The memorisation check caches the nearest-training-image distances of
held-out images the same way (``memo-...npz``).
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import numpy as np

import ms_diffusion.metrics.data as _data
from ms_diffusion.metrics.data import DatasetArrays, DatasetStream, open_dataset
from ms_diffusion.metrics.features import FeatureExtractor, extract_features
from ms_diffusion.metrics.frechet import GaussianStats, gaussian_stats
from ms_diffusion.metrics.neighbours import nearest_sq_distances

__all__ = ["cache_dir", "Reference", "reference_features", "memorization_reference", "streamed_nearest_distances",
           "CACHE_ENV", "CACHE_VERSION", "QUERY_BYTES"]

PathLike = Union[str, "os.PathLike[str]"]
CACHE_ENV = "MS_DIFFUSION_CACHE"
CACHE_VERSION = 1
#: Bytes of images compared with one pass over the training set in the memorisation check.
QUERY_BYTES = 256 << 20
_MEMO: Dict[str, object] = {}


def cache_dir() -> Path:
    """``$MS_DIFFUSION_CACHE/metrics``, else ``~/.cache/ms_diffusion/metrics``."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "ms_diffusion") / "metrics"


@dataclass
class Reference:
    """Real-data features (N, D) float32 and their Gaussian statistics, with where they came from."""

    features: np.ndarray
    stats: GaussianStats
    dataset: str
    split: str
    count: int
    extractor_key: str
    fingerprint: str
    path: Optional[Path]

    def describe(self) -> str:
        return f"{self.dataset} {self.split} ({self.count} images)"


def _atomic_savez(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _subset(n: int, count: Optional[int], seed: int) -> np.ndarray:
    if count is None or count >= n:
        return np.arange(n)
    if count < 2:
        raise ValueError(f"the reference needs at least 2 images, got {count}")
    return np.sort(np.random.default_rng(seed).choice(n, int(count), replace=False))


def reference_features(extractor: FeatureExtractor, dataset: str = "fashion_mnist", split: str = "train", *,
                       data_dir: Optional[PathLike] = None, max_images: Optional[int] = None, seed: int = 0,
                       use_cache: bool = True, refresh: bool = False, data: Optional[DatasetArrays] = None,
                       image_shape: Optional[Tuple[int, int, int]] = None,
                       log: Optional[Callable[[str], None]] = None) -> Reference:
    """Features and statistics of ``split`` of ``dataset`` under ``extractor``, from the cache when possible.

    ``max_images`` takes a fixed random subset (``seed``) instead of the whole split (useful with
    Inception on a CPU); the subset is chosen before any image is read, and the images go through the
    extractor a few megabytes at a time, so memory depends on neither the split's size nor the image
    size. ``data`` passes already-loaded arrays of that split. ``image_shape``
    (C, H, W) is that of the samples to be compared: for an extractor with a fixed input shape
    (the classifier) the real images are loaded at ``image_shape`` and then go through
    ``fit_to_extractor`` exactly as the samples do (e.g. a latent model's 32x32 Fashion-MNIST:
    both 32 -> 28); by default, and for an extractor that resizes by itself (Inception), they are
    loaded at the extractor's input shape or the dataset's own size.
    """
    if data is None:
        shape = extractor.input_shape
        if shape is not None and image_shape is not None:
            shape = tuple(image_shape)
        size, channels = (None, None) if shape is None else (tuple(shape[1:]), shape[0])
        data = open_dataset(dataset, split, data_dir=data_dir, image_size=size, channels=channels)
    total = data.count if isinstance(data, DatasetStream) else len(data.images)
    idx = _subset(total, max_images, seed)
    count = len(idx)
    name = (f"ref-{data.dataset}-{split}-{data.fingerprint}-{extractor.key}-"
            f"{count}{'' if count == total else f's{seed}'}-v{CACHE_VERSION}.npz")
    path = cache_dir() / name
    if use_cache and not refresh:
        if name in _MEMO:
            return _MEMO[name]  # type: ignore[return-value]
        if path.is_file():
            try:
                with np.load(path) as z:
                    ref = Reference(features=z["features"], stats=GaussianStats(z["mu"], z["sigma"], int(z["count"])),
                                    dataset=data.dataset, split=split, count=int(z["count"]),
                                    extractor_key=extractor.key, fingerprint=data.fingerprint, path=path)
                _MEMO[name] = ref
                return ref
            except (OSError, KeyError, ValueError) as err:  # a damaged cache file: recompute it
                if log:
                    log(f"ignoring unreadable cache file {path} ({err})")
    if log:
        log(f"computing {extractor.name} features of {count} {data.dataset} {split} images"
            f"{' (cached afterwards)' if use_cache else ''}")
    feats = extract_features(extractor, _chunks(data, idx))
    stats = gaussian_stats(feats, allow_singular=True)
    ref = Reference(features=feats, stats=stats, dataset=data.dataset, split=split, count=count,
                    extractor_key=extractor.key, fingerprint=data.fingerprint, path=path if use_cache else None)
    if use_cache:
        info = {"dataset": data.dataset, "split": split, "origin": data.origin, "extractor": extractor.key,
                "weights": extractor.weights_path, "count": count, "version": CACHE_VERSION}
        _atomic_savez(path, features=feats, mu=stats.mu, sigma=stats.sigma, count=np.int64(count),
                      info=np.array(json.dumps(info)))
        _MEMO[name] = ref
    return ref


def _chunks(data: Union[DatasetArrays, DatasetStream], idx: np.ndarray) -> Iterable[np.ndarray]:
    """The images ``idx`` of ``data`` in order, a few megabytes at a time."""
    if isinstance(data, DatasetStream):
        yield from data.chunks(idx)
        return
    step = max(1, _data.CHUNK_BYTES // max(1, data.images[:1].nbytes))
    for s in range(0, len(idx), step):
        yield data.images[idx[s:s + step]]


def streamed_nearest_distances(queries: Iterable[np.ndarray], train: DatasetStream,
                               max_bytes: Optional[int] = None) -> np.ndarray:
    """RMS pixel distance (as ``nearest_training_distances``) of each image from ``queries`` (chunks (B, C, H, W)
    in [0, 1]) to its nearest image of ``train``: (N,) float64.

    The training set is streamed, never held: the queries are taken ``max_bytes`` at a time and each
    such group is compared with every training chunk in one pass (one pass in all for small images).
    ``max_bytes`` defaults to ``QUERY_BYTES``.
    """
    max_bytes = QUERY_BYTES if max_bytes is None else max_bytes
    out: List[np.ndarray] = []
    group: List[np.ndarray] = []
    held = 0

    def flush() -> None:
        q = np.concatenate(group).reshape(sum(len(g) for g in group), -1).astype(np.float32, copy=False)
        if q.shape[1] != int(np.prod(train.shape)):
            raise ValueError(f"images of shape {group[0].shape[1:]} cannot be compared with training images of "
                             f"shape {train.shape}")
        best = np.full(len(q), np.inf)
        for t in train.chunks():
            np.minimum(best, nearest_sq_distances(q, t.reshape(len(t), -1)), out=best)
        out.append(np.sqrt(np.clip(best, 0.0, None) / q.shape[1]))
        group.clear()

    for chunk in queries:
        group.append(chunk)
        held += chunk.nbytes
        if held >= max_bytes:
            flush()
            held = 0
    if group:
        flush()
    return np.concatenate(out) if out else np.empty(0)


def memorization_reference(dataset: str, image_shape: Tuple[int, int, int], *, data_dir: Optional[PathLike] = None,
                           held_out_split: str = "test", num_held_out: int = 2000, seed: int = 0,
                           use_cache: bool = True, log: Optional[Callable[[str], None]] = None
                           ) -> Tuple[DatasetStream, np.ndarray]:
    """The training split at ``image_shape`` (C, H, W), unread (compare samples with it through
    ``streamed_nearest_distances``), and the nearest-training-image RMS distances (M,) of
    ``num_held_out`` held-out images (cached), for calibrating the memorisation threshold."""
    c, h, w = image_shape
    if h != w:
        raise ValueError(f"the memorisation check needs square images, got {h}x{w}")
    train = open_dataset(dataset, "train", data_dir=data_dir, image_size=h, channels=c)
    held = open_dataset(dataset, held_out_split, data_dir=data_dir, image_size=h, channels=c)
    idx = _subset(held.count, num_held_out, seed)
    name = (f"memo-{train.dataset}-{train.fingerprint}-{held_out_split}-{held.fingerprint}-{c}x{h}x{w}-"
            f"{len(idx)}-v{CACHE_VERSION}.npz")
    path = cache_dir() / name
    if use_cache and name in _MEMO:
        return train, _MEMO[name]  # type: ignore[return-value]
    if use_cache and path.is_file():
        try:
            with np.load(path) as z:
                dist = z["distances"]
            _MEMO[name] = dist
            return train, dist
        except (OSError, KeyError, ValueError):
            pass
    if log:
        log(f"computing nearest-training-image distances of {len(idx)} held-out {held_out_split} images"
            f"{' (cached afterwards)' if use_cache else ''}")
    dist = streamed_nearest_distances(held.chunks(idx), train)
    if use_cache:
        _atomic_savez(path, distances=dist)
        _MEMO[name] = dist
    return train, dist
