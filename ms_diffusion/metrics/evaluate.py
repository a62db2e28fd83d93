"""``evaluate_samples``: every metric of generated images against a dataset, as one dict; samples I/O; the table.

Metrics (names for ``metrics=``):

``fd``            Fréchet distance between Gaussians fitted to sample and real-train features (FID
                  when the features are the Inception-v3's); ``bootstrap`` rounds add its noise level.
``kid``           Kernel Inception Distance in the same feature space (torch-fidelity convention).
``pr``            Improved precision / recall (k = 3) against as many real features as samples.
``memorization``  Share of samples closer (RMS pixel distance) to a training image than all but 1%
                  of held-out test images are.

Every result carries the sample count, the reference (dataset, split, image count) and the
feature extractor's identity (name + weights hash).
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np

import ms_diffusion.metrics.data as _data
from ms_diffusion.metrics.features import FeatureExtractor, extract_features, get_extractor
from ms_diffusion.metrics.frechet import (TooFewSamplesError, bootstrap_frechet_distance, frechet_distance_from_features)
from ms_diffusion.metrics.kid import kernel_inception_distance
from ms_diffusion.metrics.neighbours import memorization, precision_recall
from ms_diffusion.metrics.reference import memorization_reference, reference_features, streamed_nearest_distances

__all__ = ["METRICS", "evaluate_samples", "Samples", "open_samples", "load_samples", "check_images", "format_table",
           "parse_metrics"]

PathLike = Union[str, "os.PathLike[str]"]
METRICS = ("fd", "kid", "pr", "memorization")
_ALIASES = {"fid": "fd", "frechet": "fd", "precision": "pr", "recall": "pr", "prc": "pr", "memo": "memorization",
            "memorisation": "memorization", "mem": "memorization"}
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def parse_metrics(spec: Union[str, Sequence[str]]) -> List[str]:
    """``"fd,kid"`` or ["fd", "kid"] (aliases: fid, precision, recall, memo) -> canonical names in order."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: List[str] = []
    for item in items:
        key = str(item).strip().lower()
        if not key:
            continue
        key = _ALIASES.get(key, key)
        if key == "all":
            return list(METRICS)
        if key not in METRICS:
            raise ValueError(f"unknown metric {item!r}; choose from {', '.join(METRICS)} (or all)")
        if key not in out:
            out.append(key)
    if not out:
        raise ValueError(f"no metric given; choose from {', '.join(METRICS)}")
    return out


def _check_shape(shape: Sequence[int], what: str) -> None:
    if len(shape) != 4:
        raise ValueError(f"{what} must be an array (N, C, H, W) in [0, 1], got shape {tuple(shape)}")
    if shape[1] not in (1, 3):
        hint = " (it looks like (N, H, W, C): transpose it to (N, C, H, W))" if shape[-1] in (1, 3) else ""
        raise ValueError(f"{what} must be (N, C, H, W) with C = 1 or 3, got shape {tuple(shape)}{hint}")
    if shape[0] == 0:
        raise ValueError(f"{what}: no images")


def _check_values(x: np.ndarray, what: str) -> np.ndarray:
    """A chunk (B, C, H, W) of uint8 (0..255) or floats in [0, 1] -> float32 in [0, 1]."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    x = x.astype(np.float32, copy=False)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what} contain NaN or inf values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        hint = " (model outputs in [-1, 1] must be mapped with (x + 1) / 2)" if lo < -1e-3 else ""
        raise ValueError(f"{what} must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]{hint}")
    return np.clip(x, 0.0, 1.0)


def check_images(images: np.ndarray, what: str = "samples") -> np.ndarray:
    """Validate generated images: (N, C, H, W) with C in {1, 3}, finite, in [0, 1]; returns float32."""
    x = np.asarray(images)
    _check_shape(x.shape, what)
    return _check_values(x, what)


class Samples:
    """Generated images read chunk by chunk: ``len(samples)`` images of ``shape`` (C, H, W).

    ``chunks()`` yields validated float32 (B, C, H, W) in [0, 1], about ``CHUNK_BYTES`` at a time, in
    order; it can be called again (the memorisation check reads the samples once per group). Made by
    ``open_samples`` (an .npz or a folder, read lazily) or ``Samples.from_array``.
    """

    def __init__(self, name: str, count: int, shape: Sequence[int],
                 read: Callable[[int], Iterator[np.ndarray]]):
        self.name, self.count, self.shape, self._read = name, int(count), tuple(int(v) for v in shape), read

    @classmethod
    def from_array(cls, images: np.ndarray, name: str = "samples") -> "Samples":
        x = np.asarray(images)
        _check_shape(x.shape, name)

        def read(rows: int) -> Iterator[np.ndarray]:
            for s in range(0, len(x), rows):
                yield x[s:s + rows]

        return cls(name, len(x), x.shape[1:], read)

    def __len__(self) -> int:
        return self.count

    def chunks(self, max_bytes: Optional[int] = None) -> Iterator[np.ndarray]:
        """Validated float32 chunks (B, C, H, W) in [0, 1] of ``max_bytes`` (default ``CHUNK_BYTES``) or one image."""
        rows = max(1, (_data.CHUNK_BYTES if max_bytes is None else max_bytes) // (4 * int(np.prod(self.shape))))
        for chunk in self._read(rows):
            yield _check_values(np.asarray(chunk), self.name)

    def load(self) -> np.ndarray:
        """All of them as one float32 array (N, C, H, W) in [0, 1]."""
        out = np.empty((self.count, *self.shape), np.float32)
        done = 0
        for chunk in self.chunks():
            out[done:done + len(chunk)] = chunk
            done += len(chunk)
        return out


_GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")


def _open_folder(p: Path, limit: Optional[int]) -> Samples:
    from PIL import Image

    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{p} holds no image files ({', '.join(_IMAGE_SUFFIXES)})")
    if limit is not None:
        files = files[:limit]

    def rgb(f: Path) -> np.ndarray:
        try:
            with Image.open(f) as im:
                return np.asarray(im.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0
        except OSError as err:
            raise ValueError(f"cannot read image {f}: {err}") from None

    # one pass over the headers (and the pixels of colour-mode files until one is not grey): sizes, channels
    sizes, grey = set(), True
    for f in files:
        try:
            with Image.open(f) as im:
                sizes.add((im.height, im.width))
                mode = im.mode
        except OSError as err:
            raise ValueError(f"cannot read image {f}: {err}") from None
        if grey and mode not in _GREY_MODES:
            x = rgb(f)
            grey = bool(np.array_equal(x[0], x[1]) and np.array_equal(x[1], x[2]))
    if len(sizes) > 1:
        shapes = sorted(sizes)   # (H, W)
        raise ValueError(f"images in {p} differ in size ({', '.join(map(str, shapes[:4]))}); one image per "
                         f"file is expected (not a sample grid)")
    (h, w), = sizes
    channels = 1 if grey else 3   # all grey: one channel

    def read(rows: int) -> Iterator[np.ndarray]:
        for s in range(0, len(files), rows):
            chunk = np.stack([rgb(f) for f in files[s:s + rows]])
            yield chunk[:, :1] if grey else chunk

    return Samples(str(p), len(files), (channels, h, w), read)


def _npz_problem(p: Path) -> Optional[str]:
    """Why ``p`` is not an .npz archive (a zip), or None if it starts like one."""
    with open(p, "rb") as f:
        head = f.read(8)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return None
    if not head:
        return "the file is empty"
    if head.startswith(b"\x93NUMPY"):
        return "it is a single .npy array, not an .npz archive (rename it .npy and np.savez(FILE, images=array))"
    return f"it is not an .npz (zip) archive (it starts with {head[:8]!r})"


def _open_npz(p: Path, limit: Optional[int]) -> Samples:
    fix = "write samples with sample.py --npz FILE.npz or numpy.savez(FILE, images=array)"
    problem = _npz_problem(p)
    if problem:
        raise ValueError(f"cannot read samples {p}: {problem}; {fix}")

    def member():
        """(zip file, open 'images.npy' member positioned at the data, shape, dtype, fortran order)."""
        try:
            zf = zipfile.ZipFile(p)
        except (OSError, EOFError, zipfile.BadZipFile) as err:  # truncated / damaged
            raise ValueError(f"cannot read samples {p}: {err} (a damaged or truncated .npz); {fix}") from None
        names = [n[:-4] if n.endswith(".npy") else n for n in zf.namelist()]
        if "images" not in names:
            zf.close()
            raise ValueError(f"{p} has no 'images' array (has: {', '.join(names) or 'nothing'}); "
                             f"write it with sample.py --npz")
        f = zf.open(zf.namelist()[names.index("images")])
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:   # 3.0 (utf-8 field names): only numpy's private reader takes it
                shape, fortran, dtype = np.lib.format._read_array_header(f, version)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
            f.close()
            zf.close()
            raise ValueError(f"cannot read samples {p}: its 'images' member is not a numpy array ({err}); "
                             f"{fix}") from None
        if dtype.hasobject:
            f.close()
            zf.close()
            raise ValueError(f"{p}: 'images' holds Python objects, not numbers; {fix}")
        return zf, f, shape, dtype, fortran

    zf, f, shape, dtype, fortran = member()
    f.close()
    zf.close()
    _check_shape(shape, str(p))
    count = shape[0] if limit is None else min(shape[0], limit)
    row = int(np.prod(shape[1:]))

    def read(rows: int) -> Iterator[np.ndarray]:
        zf, f, _, _, _ = member()
        try:
            if fortran:   # column-major on disk: rows are not contiguous, read it whole (rare: np.asfortranarray)
                data = np.frombuffer(f.read(), dtype=dtype).reshape(shape[::-1]).T
                for s in range(0, count, rows):
                    yield data[s:min(s + rows, count)]
                return
            for s in range(0, count, rows):
                n = min(rows, count - s)
                try:
                    raw = f.read(n * row * dtype.itemsize)
                except (OSError, EOFError, zipfile.BadZipFile) as err:
                    raise ValueError(f"cannot read samples {p}: {err} (a damaged .npz); {fix}") from None
                if len(raw) != n * row * dtype.itemsize:
                    got = s + len(raw) // (row * dtype.itemsize)
                    raise ValueError(f"cannot read samples {p}: 'images' ends after {got} of {shape[0]} images "
                                     f"(a truncated .npz); {fix}")
                yield np.frombuffer(raw, dtype=dtype).reshape(n, *shape[1:])
        finally:
            f.close()
            zf.close()

    return Samples(str(p), count, shape[1:], read)


def open_samples(path: PathLike, limit: Optional[int] = None) -> Samples:
    """Generated images from an .npz (key ``images`` (N, C, H, W), as ``sample.py --npz`` writes) or a folder
    of image files (sorted by name, all one size; 1 channel when every image is grey, else 3), read
    lazily in chunks. Shapes, sizes and the archive are checked now; values as the chunks are read.

    ``limit`` keeps the first ``limit`` images.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"samples {str(p)!r} do not exist (give a folder of PNGs or an .npz from "
                                f"sample.py --npz)")
    if p.is_dir():
        return _open_folder(p, limit)
    if p.suffix.lower() != ".npz":
        raise ValueError(f"samples must be a folder of images or an .npz file, got {str(p)!r}")
    return _open_npz(p, limit)


def load_samples(path: PathLike, limit: Optional[int] = None) -> np.ndarray:
    """Images (N, C, H, W) float32 in [0, 1] from an .npz or a folder (see ``open_samples``), all in memory.

    ``limit`` keeps the first ``limit`` images.
    """
    return open_samples(path, limit).load()


def evaluate_samples(images: Union[np.ndarray, Samples], dataset: str = "fashion_mnist", *,
                     metrics: Union[str, Sequence[str]] = METRICS, features: str = "classifier",
                     weights: Optional[PathLike] = None, extractor: Optional[FeatureExtractor] = None,
                     data_dir: Optional[PathLike] = None, reference_split: str = "train",
                     max_reference: Optional[int] = None, bootstrap: int = 0, kid_subsets: int = 100,
                     kid_subset_size: int = 1000, pr_k: int = 3, memorization_threshold: Optional[float] = None,
                     memorization_quantile: float = 0.01, memorization_held_out: int = 2000, seed: int = 0,
                     use_cache: bool = True, log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Evaluate generated ``images`` (N, C, H, W) in [0, 1] against ``dataset``; returns a flat dict.

    Keys (present for the metrics asked): ``num_samples``, ``features`` (extractor key),
    ``reference`` (e.g. "fashion_mnist train (60000 images)"), ``fd`` (+ ``fd_std`` with
    ``bootstrap`` >= 2), ``kid``, ``kid_std``, ``kid_subset_size``,
    ``precision``, ``recall``, ``memorization`` (fraction of samples below the threshold),
    ``memorization_threshold``, ``memorization_reference_fraction``, ``nn_distance_median``,
    ``nn_distance_median_held_out``. ``features`` is ``"classifier"`` (``weights`` defaults to the
    shipped checkpoint) or ``"inception"`` (``weights``: a converted checkpoint); ``extractor``
    overrides both. Reference features are cached (see ``ms_diffusion.metrics.reference``).

    ``images`` may be ``Samples`` (``open_samples``: an .npz or a folder read lazily). Memory is
    bounded by what is asked, not by the data: samples and real images go through the feature
    network a few megabytes at a time (only features are kept), a ``max_reference`` subset is chosen
    before any real image is read, and the memorisation check streams the training set past at most
    ``QUERY_BYTES`` of samples at a time.
    """
    samples = images if isinstance(images, Samples) else Samples.from_array(images)
    wanted = parse_metrics(metrics)
    n = len(samples)
    result: Dict[str, Any] = {"num_samples": n}
    feature_metrics = [m for m in wanted if m in ("fd", "kid", "pr")]
    if feature_metrics:
        ext = extractor or get_extractor(features, weights)
        fake = extract_features(ext, samples.chunks())   # first: reads and checks every sample before the reference
        ref = reference_features(ext, dataset, reference_split, data_dir=data_dir, max_images=max_reference,
                                 seed=seed, use_cache=use_cache, image_shape=samples.shape, log=log)
        result["features"] = ext.key
        result["reference"] = ref.describe()
        if "fd" in wanted:
            fd = frechet_distance_from_features(fake, ref.stats)
            result["fd"] = fd.value
            if bootstrap >= 2:
                result["fd_std"], _ = bootstrap_frechet_distance(fake, ref.stats, rounds=bootstrap, seed=seed)
        if "kid" in wanted:
            kid = kernel_inception_distance(fake, ref.features, subsets=kid_subsets, subset_size=kid_subset_size,
                                            seed=seed)
            result.update(kid=kid.mean, kid_std=kid.std, kid_subset_size=kid.subset_size)
        if "pr" in wanted:
            if n < pr_k + 1:
                raise TooFewSamplesError(f"precision/recall with k={pr_k} needs more than {pr_k} samples, got {n}")
            rng = np.random.default_rng(seed)
            real = ref.features[np.sort(rng.choice(len(ref.features), min(n, len(ref.features)), replace=False))]
            pr = precision_recall(real, fake, k=pr_k)
            result.update(precision=pr.precision, recall=pr.recall, pr_k=pr.k, pr_num_real=pr.num_real)
    if "memorization" in wanted:
        if not feature_metrics:
            for _ in samples.chunks():   # check every sample before the held-out distances are computed
                pass
        train, held_out = memorization_reference(dataset, samples.shape, data_dir=data_dir,
                                                 num_held_out=memorization_held_out, seed=seed, use_cache=use_cache,
                                                 log=log)
        dist = streamed_nearest_distances(samples.chunks(), train)
        memo = memorization(dist, held_out, threshold=memorization_threshold, quantile=memorization_quantile)
        result.update(memorization=memo.fraction_below, memorization_threshold=memo.threshold,
                      memorization_reference_fraction=memo.reference_fraction, nn_distance_median=memo.median,
                      nn_distance_median_held_out=memo.reference_median, memorization_num_held_out=memo.num_reference,
                      memorization_train_images=train.count)
        result.setdefault("reference", f"{train.dataset} train ({train.count} images)")
    return result


def format_table(result: Dict[str, Any]) -> str:
    """One plain-text table (metric, value, samples, reference) of an ``evaluate_samples`` result."""
    n = result["num_samples"]
    ref = result.get("reference", "")
    feat = result.get("features", "")
    fd_name = "FID (Inception-v3)" if feat.startswith("inception") else "FD (classifier features)"
    rows = []
    if "fd" in result:
        value = f"{result['fd']:.4g}" + (f" ± {result['fd_std']:.2g} (bootstrap sd)" if "fd_std" in result else "")
        rows.append((fd_name, value, str(n), ref))
    if "kid" in result:
        rows.append((f"KID (x1000, subsets of {result['kid_subset_size']})",
                     f"{result['kid'] * 1e3:.4g} ± {result['kid_std'] * 1e3:.2g}", str(n), ref))
    if "precision" in result:
        real = f"{result['pr_num_real']} real of {ref}"
        rows.append((f"precision (k={result['pr_k']})", f"{result['precision']:.4f}", str(n), real))
        rows.append((f"recall (k={result['pr_k']})", f"{result['recall']:.4f}", str(n), real))
    if "memorization" in result:
        held = (f"held-out: {result['memorization_reference_fraction']:.2%} of "
                f"{result['memorization_num_held_out']} test images")
        rows.append((f"memorised (NN RMS dist < {result['memorization_threshold']:.4f})",
                     f"{result['memorization']:.2%}", str(n), f"{result['memorization_train_images']} train; {held}"))
        rows.append(("median NN distance to train", f"{result['nn_distance_median']:.4f}", str(n),
                     f"held-out test: {result['nn_distance_median_held_out']:.4f}"))
    header = ("metric", "value", "samples", "reference")
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(4)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    if feat:
        out.append(f"features: {feat}")
    return "\n".join(out)
