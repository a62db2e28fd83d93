"""Feature extractors: the project's Fashion-MNIST classifier (offline default) or the FID Inception-v3.

A ``FeatureExtractor`` maps images (N, C, H, W) in [0, 1] to features (N, D) float32 and carries
an identity (``key``: name + the first 16 hex digits of the weights file's SHA-256) used in cache
keys and printed with every result, so numbers from different weights are never mixed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import numpy as np

__all__ = ["FeatureExtractor", "classifier_extractor", "inception_extractor", "get_extractor", "fit_to_extractor",
           "extract_features", "EXTRACTOR_KINDS"]

PathLike = Union[str, "os.PathLike[str]"]
EXTRACTOR_KINDS = ("classifier", "inception")
_LOADED: Dict[Tuple[str, str, float], "FeatureExtractor"] = {}


@dataclass
class FeatureExtractor:
    """A feature network: ``extractor(images (N, C, H, W) in [0, 1]) -> (N, dim) float32``.

    ``input_shape`` is the (C, H, W) it requires, or None when it resizes any input itself.
    ``batch_size`` is how many images ``fn`` runs through the network at once (None: unknown);
    ``extract_features`` feeds it multiples of that, so streamed features equal one whole call's.
    """

    name: str
    weights_sha256: str
    weights_path: str
    dim: int
    input_shape: Optional[Tuple[int, int, int]]
    description: str
    fn: Callable[[np.ndarray], np.ndarray] = field(repr=False)
    batch_size: Optional[int] = None

    @property
    def key(self) -> str:
        """Identity for cache keys: ``name-<16 hex digits of the weights' SHA-256>``."""
        return f"{self.name}-{self.weights_sha256[:16]}"

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W) in [0, 1], got shape {images.shape}")
        if self.input_shape is not None and tuple(images.shape[1:]) != self.input_shape:
            c, h, w = self.input_shape
            raise ValueError(f"the {self.description} takes images of shape (N, {c}, {h}, {w}), got {images.shape}; "
                             f"evaluate samples at the dataset's own size, or use --features inception")
        return np.asarray(self.fn(images.astype(np.float32, copy=False)), dtype=np.float32)


def _memo_key(kind: str, path: Path) -> Tuple[str, str, float]:
    return kind, str(path.resolve()), path.stat().st_mtime


def classifier_extractor(weights: Optional[PathLike] = None, batch_size: int = 500) -> FeatureExtractor:
    """Penultimate-layer features of the Fashion-MNIST classifier (default: the shipped checkpoint)."""
    from ms_diffusion.metrics.classifier import SHIPPED_CLASSIFIER, classifier_outputs, load_classifier

    path = Path(weights) if weights is not None else SHIPPED_CLASSIFIER
    if path.is_file() and _memo_key("classifier", path) in _LOADED:
        return _LOADED[_memo_key("classifier", path)]
    net, meta = load_classifier(weights)
    cfg = net.config

    def fn(images: np.ndarray) -> np.ndarray:
        return classifier_outputs(net, images, batch_size)[0]

    acc = meta.get("test_accuracy")
    desc = "Fashion-MNIST classifier" + (f" (test accuracy {acc:.1%})" if isinstance(acc, float) else "")
    ext = FeatureExtractor(name="fmnist-classifier", weights_sha256=meta["sha256"], weights_path=str(path),
                           dim=cfg.feature_dim, input_shape=(cfg.in_channels, cfg.image_size, cfg.image_size),
                           description=desc, fn=fn, batch_size=batch_size)
    _LOADED[_memo_key("classifier", path)] = ext
    return ext


def inception_extractor(weights: PathLike, batch_size: int = 50) -> FeatureExtractor:
    """pool3 features of the FID Inception-v3 from a checkpoint made by scripts/convert_fid_inception.py."""
    from ms_diffusion.io.hashing import file_sha256
    from ms_diffusion.metrics.inception import FID_FEATURE_DIM, inception_features, load_fid_inception

    path = Path(weights)
    if path.is_file() and _memo_key("inception", path) in _LOADED:
        return _LOADED[_memo_key("inception", path)]
    net, _ = load_fid_inception(path)

    def fn(images: np.ndarray) -> np.ndarray:
        return inception_features(net, images, batch_size)

    ext = FeatureExtractor(name="inception-v3-fid", weights_sha256=file_sha256(path), weights_path=str(path),
                           dim=FID_FEATURE_DIM, input_shape=None, description="FID Inception-v3 (pool3)", fn=fn,
                           batch_size=batch_size)
    _LOADED[_memo_key("inception", path)] = ext
    return ext


def get_extractor(kind: str = "classifier", weights: Optional[PathLike] = None) -> FeatureExtractor:
    """``"classifier"`` (weights optional: the shipped checkpoint) or ``"inception"`` (weights required)."""
    if kind == "classifier":
        return classifier_extractor(weights)
    if kind == "inception":
        if weights is None:
            raise ValueError("FID with Inception-v3 needs the converted weights: pass --inception-weights FILE "
                             "(make it with scripts/convert_fid_inception.py; see docs/evaluation.md)")
        return inception_extractor(weights)
    raise ValueError(f"unknown feature extractor {kind!r}; choose one of {EXTRACTOR_KINDS}")


def fit_to_extractor(images: np.ndarray, extractor: FeatureExtractor) -> np.ndarray:
    """Images (N, C, H, W) in [0, 1] -> the (C', H', W') the extractor takes, unchanged when they already fit.

    Channels: RGB -> gray with PIL's ``L`` weights (0.299, 0.587, 0.114), gray -> RGB by repetition.
    Size: PIL bicubic per image and channel in float (antialiased when shrinking), e.g. a latent
    model's 32x32 Fashion-MNIST samples back to the classifier's 28x28.
    """
    from PIL import Image

    x = np.asarray(images, dtype=np.float32)
    if extractor.input_shape is None or tuple(x.shape[1:]) == tuple(extractor.input_shape):
        return x
    c, h, w = extractor.input_shape
    if x.shape[1] != c:
        if x.shape[1] == 3 and c == 1:
            x = np.tensordot(x, np.array([0.299, 0.587, 0.114], np.float32), axes=([1], [0]))[:, None]
        elif x.shape[1] == 1:
            x = np.repeat(x, c, axis=1)
        else:
            raise ValueError(f"cannot map {x.shape[1]}-channel images to the {c} channels of the "
                             f"{extractor.description}")
    if x.shape[2:] != (h, w):
        x = np.stack([[np.asarray(Image.fromarray(ch, mode="F").resize((w, h), Image.BICUBIC)) for ch in img]
                      for img in x])
    return np.clip(x, 0.0, 1.0).astype(np.float32)


_PENDING_BYTES = 64 << 20  # fitted images held for an extractor that does not say its batch size


def extract_features(extractor: FeatureExtractor, chunks: Iterable[np.ndarray]) -> np.ndarray:
    """Features (N, dim) float32 of images that arrive in chunks (each (B, C, H, W) in [0, 1]), never all held.

    Each chunk goes through ``fit_to_extractor`` (a per-image map) as it arrives; the fitted images
    reach the network in multiples of ``extractor.batch_size``, i.e. in the very batches one call on
    all the images would use, so the features are the same bit for bit. Memory: one chunk, plus
    fewer than ``batch_size`` fitted images (or 64 MB of them when the batch size is unknown).
    """
    feats: List[np.ndarray] = []
    pending: List[np.ndarray] = []
    held = 0
    for chunk in chunks:
        fitted = fit_to_extractor(chunk, extractor)
        pending.append(fitted)
        held += len(fitted)
        step = extractor.batch_size
        if step:
            if held >= step:
                x = np.concatenate(pending) if len(pending) > 1 else pending[0]
                cut = held // step * step
                feats.append(extractor(x[:cut]))
                pending = [x[cut:].copy()] if cut < held else []   # not a view pinning x
                held -= cut
        elif sum(p.nbytes for p in pending) >= _PENDING_BYTES:
            feats.append(extractor(np.concatenate(pending)))
            pending, held = [], 0
    if held:
        feats.append(extractor(np.concatenate(pending)))
    if not feats:
        raise ValueError("no images to extract features from")
    return np.concatenate(feats) if len(feats) > 1 else feats[0]
