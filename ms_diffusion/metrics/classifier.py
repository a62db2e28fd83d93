"""A small CNN classifier for Fashion-MNIST whose penultimate layer is the offline feature space.

FID's Inception-v3 weights cannot be downloaded here, so the project trains its own feature
network (``models.classifier``) on the real Fashion-MNIST train split (``training.classifier``,
``scripts/train_fmnist_classifier.py``) and ships
the checkpoint (``ms_diffusion/metrics/weights/fmnist_classifier.ckpt``, ~0.3 MB). Distances in
its feature space are comparable between runs that use the *same* weights only; the weights'
SHA-256 is part of every cached statistic and is printed with every result.

Network (``FashionClassifier``, default widths w = (24, 48, 96); ~73k parameters), input
(B, 1, 28, 28) in [0, 1], scaled to [-1, 1]::

    conv3x3 1->w0, BN, ReLU                               28x28
    maxpool 2                                             14x14
    conv3x3 w0->w1, BN, ReLU; conv3x3 w1->w1, BN, ReLU
    maxpool 2                                              7x7
    conv3x3 w1->w2, BN, ReLU
    global average pool   -> features (B, w2), non-negative   (the "penultimate layer")
    dense w2->10          -> logits (B, 10)

The widths are small because MindSpore trains convolutions slowly on CPU (a batch of 128 takes
~0.3 s at widths (16, 32, 64) on 2 cores, which reached only 88.4% test accuracy in 2 epochs);
the default reaches >= 90% in three epochs (about ten minutes).
"""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

import numpy as np
from mindspore import Tensor

from ms_diffusion.io.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ms_diffusion.io.hashing import file_sha256
from ms_diffusion.io.state import ConversionError, load_arrays_into, named_parameters
from ms_diffusion.models.classifier import ClassifierConfig, FashionClassifier
from ms_diffusion.runtime import maybe_jit

__all__ = ["FashionClassifier", "ClassifierConfig", "classifier_outputs", "accuracy", "check_classifier_images",
           "save_classifier", "load_classifier", "file_sha256", "CLASSIFIER_KIND", "SHIPPED_CLASSIFIER"]

PathLike = Union[str, "os.PathLike[str]"]

#: ``meta["kind"]`` of a classifier checkpoint written by ``save_classifier``.
CLASSIFIER_KIND = "ms_diffusion.fmnist_classifier"
#: The checkpoint trained on real Fashion-MNIST and shipped with the package.
SHIPPED_CLASSIFIER = Path(__file__).resolve().parent / "weights" / "fmnist_classifier.ckpt"


def check_classifier_images(images: np.ndarray, config: ClassifierConfig) -> np.ndarray:
    images = np.asarray(images)
    want = (config.in_channels, config.image_size, config.image_size)
    if images.ndim != 4 or tuple(images.shape[1:]) != want:
        raise ValueError(f"the Fashion-MNIST classifier takes images of shape (N, {want[0]}, {want[1]}, {want[2]}) "
                         f"in [0, 1]; got {images.shape}. Resize/convert the samples or use a feature extractor "
                         f"made for them")
    return images.astype(np.float32, copy=False)


def classifier_outputs(net: FashionClassifier, images: np.ndarray, batch_size: int = 500
                       ) -> Tuple[np.ndarray, np.ndarray]:
    """Features (N, D) float32 and logits (N, classes) float32 of ``images`` (N, C, S, S) in [0, 1].

    Runs in eval mode (BatchNorm running statistics) in fixed-size batches (the last one padded), so
    one compiled graph serves every call.
    """
    images = check_classifier_images(images, net.config)
    net.set_train(False)
    n = len(images)
    if n == 0:
        return (np.zeros((0, net.config.feature_dim), np.float32), np.zeros((0, net.config.num_classes), np.float32))
    bs = min(int(batch_size), n)
    fwd = _forward_fn(net)
    feats, logits = [], []
    for start in range(0, n, bs):
        chunk = images[start:start + bs]
        if len(chunk) < bs:
            chunk = np.concatenate([chunk, np.zeros((bs - len(chunk),) + chunk.shape[1:], np.float32)])
        f, z = fwd(Tensor(chunk))
        keep = min(bs, n - start)
        feats.append(f.asnumpy()[:keep])
        logits.append(z.asnumpy()[:keep])
    return np.concatenate(feats), np.concatenate(logits)


def _forward_fn(net: FashionClassifier) -> Callable:
    cached = getattr(net, "_ms_diffusion_forward", None)
    if cached is not None:
        return cached

    def forward(x):
        f = net.features(x)
        return f, net.head(f)

    fn = maybe_jit(forward)
    object.__setattr__(net, "_ms_diffusion_forward", fn)
    return fn


def accuracy(net: FashionClassifier, images: np.ndarray, labels: np.ndarray, batch_size: int = 500) -> float:
    """Top-1 accuracy in [0, 1] of ``net`` on ``images`` (N, C, S, S) in [0, 1] with int ``labels`` (N,)."""
    _, logits = classifier_outputs(net, images, batch_size)
    return float(np.mean(np.argmax(logits, axis=1) == np.asarray(labels).reshape(-1)))


def save_classifier(net: FashionClassifier, path: PathLike, meta: Optional[Dict] = None) -> Path:
    """Atomically write ``net``'s weights (BatchNorm statistics included) and ``meta`` to a .ckpt file."""
    info = {"kind": CLASSIFIER_KIND, "config": asdict(net.config), **(meta or {})}
    return save_checkpoint(path, named_parameters(net), info)


def load_classifier(path: Optional[PathLike] = None) -> Tuple[FashionClassifier, Dict]:
    """Rebuild a classifier from a checkpoint written by ``save_classifier`` (default: the shipped one).

    Returns (network in eval mode, metadata incl. ``path`` and ``sha256``). Raises CheckpointError
    for a missing file or a checkpoint of something else.
    """
    p = Path(path) if path is not None else SHIPPED_CLASSIFIER
    if not p.is_file():
        hint = (" (the package's shipped classifier is missing: reinstall ms_diffusion or train one with "
                "scripts/train_fmnist_classifier.py)" if path is None else
                "; train one with scripts/train_fmnist_classifier.py --out PATH")
        raise CheckpointError(f"classifier checkpoint {str(p)!r} does not exist{hint}")
    arrays, meta = load_checkpoint(p)
    if meta.get("kind") != CLASSIFIER_KIND:
        raise CheckpointError(f"{p} is not a Fashion-MNIST classifier checkpoint (kind {meta.get('kind')!r}); "
                              f"write one with scripts/train_fmnist_classifier.py")
    raw = dict(meta["config"])
    raw["widths"] = tuple(raw["widths"])
    net = FashionClassifier(ClassifierConfig(**raw))
    try:
        load_arrays_into(net, arrays)
    except ConversionError as err:
        raise CheckpointError(f"{p}: {err}") from None
    net.set_train(False)
    meta = dict(meta, path=str(p), sha256=file_sha256(p))
    return net, meta
