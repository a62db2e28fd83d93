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
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from ms_diffusion.metrics.features import FeatureExtractor, fit_to_extractor, get_extractor
from ms_diffusion.metrics.frechet import (TooFewSamplesError, bootstrap_frechet_distance, frechet_distance_from_features)
from ms_diffusion.metrics.kid import kernel_inception_distance
from ms_diffusion.metrics.neighbours import memorization, nearest_training_distances, precision_recall
from ms_diffusion.metrics.reference import memorization_reference, reference_features

__all__ = ["METRICS", "evaluate_samples", "load_samples", "check_images", "format_table", "parse_metrics"]

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


def check_images(images: np.ndarray, what: str = "samples") -> np.ndarray:
    """Validate generated images: (N, C, H, W) with C in {1, 3}, finite, in [0, 1]; returns float32."""
    x = np.asarray(images)
    if x.ndim != 4:
        raise ValueError(f"{what} must be an array (N, C, H, W) in [0, 1], got shape {x.shape}")
    if x.shape[1] not in (1, 3):
        hint = " (it looks like (N, H, W, C): transpose it to (N, C, H, W))" if x.shape[-1] in (1, 3) else ""
        raise ValueError(f"{what} must be (N, C, H, W) with C = 1 or 3, got shape {x.shape}{hint}")
    if len(x) == 0:
        raise ValueError(f"{what}: no images")
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


def load_samples(path: PathLike, limit: Optional[int] = None) -> np.ndarray:
    """Images (N, C, H, W) float32 in [0, 1] from an .npz (key ``images``, as ``sample.py --npz`` writes)
    or a folder of image files (sorted by name, all one size; 1 channel when every image is grey, else 3).

    ``limit`` keeps the first ``limit`` images.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"samples {str(p)!r} do not exist (give a folder of PNGs or an .npz from "
                                f"sample.py --npz)")
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in _IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"{p} holds no image files ({', '.join(_IMAGE_SUFFIXES)})")
        if limit is not None:
            files = files[:limit]
        from PIL import Image

        arrays = []
        for f in files:
            try:
                with Image.open(f) as im:
                    arrays.append(np.asarray(im.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0)
            except OSError as err:
                raise ValueError(f"cannot read image {f}: {err}") from None
        shapes = sorted({a.shape[1:] for a in arrays})
        if len(shapes) > 1:
            raise ValueError(f"images in {p} differ in size ({', '.join(map(str, shapes[:4]))}); one image per "
                             f"file is expected (not a sample grid)")
        stacked = np.stack(arrays)
        if np.array_equal(stacked[:, 0], stacked[:, 1]) and np.array_equal(stacked[:, 1], stacked[:, 2]):
            stacked = stacked[:, :1]  # all grey: one channel
        return check_images(stacked, str(p))
    if p.suffix.lower() != ".npz":
        raise ValueError(f"samples must be a folder of images or an .npz file, got {str(p)!r}")
    try:
        with np.load(p, allow_pickle=False) as z:
            if "images" not in z.files:
                raise ValueError(f"{p} has no 'images' array (has: {', '.join(z.files) or 'nothing'}); "
                                 f"write it with sample.py --npz")
            images = z["images"]
    except (OSError, EOFError, zipfile.BadZipFile) as err:  # not a zip / truncated
        raise ValueError(f"cannot read {p}: {err}") from None
    if limit is not None:
        images = images[:limit]
    return check_images(images, str(p))


def evaluate_samples(images: np.ndarray, dataset: str = "fashion_mnist", *,
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
    """
    images = check_images(images)
    wanted = parse_metrics(metrics)
    n = len(images)
    result: Dict[str, Any] = {"num_samples": n}
    feature_metrics = [m for m in wanted if m in ("fd", "kid", "pr")]
    if feature_metrics:
        ext = extractor or get_extractor(features, weights)
        ref = reference_features(ext, dataset, reference_split, data_dir=data_dir, max_images=max_reference,
                                 seed=seed, use_cache=use_cache, image_shape=tuple(images.shape[1:]), log=log)
        result["features"] = ext.key
        result["reference"] = ref.describe()
        fake = ext(fit_to_extractor(images, ext))
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
        train, held_out = memorization_reference(dataset, tuple(images.shape[1:]), data_dir=data_dir,
                                                 num_held_out=memorization_held_out, seed=seed, use_cache=use_cache,
                                                 log=log)
        dist = nearest_training_distances(images, train.images)
        memo = memorization(dist, held_out, threshold=memorization_threshold, quantile=memorization_quantile)
        result.update(memorization=memo.fraction_below, memorization_threshold=memo.threshold,
                      memorization_reference_fraction=memo.reference_fraction, nn_distance_median=memo.median,
                      nn_distance_median_held_out=memo.reference_median, memorization_num_held_out=memo.num_reference,
                      memorization_train_images=len(train.images))
        result.setdefault("reference", f"{train.dataset} train ({len(train.images)} images)")
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
