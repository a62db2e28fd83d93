"""A small CNN classifier for Fashion-MNIST whose penultimate layer is the offline feature space.

FID's Inception-v3 weights cannot be downloaded here, so the project trains its own feature
network on the real Fashion-MNIST train split (``scripts/train_fmnist_classifier.py``) and ships
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

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn

from ms_diffusion.io.hashing import file_sha256
from ms_diffusion.io.state import ConversionError, load_arrays_into, named_parameters
from ms_diffusion.nn.layers import conv2d, dense
from ms_diffusion.runtime import maybe_jit
from ms_diffusion.io.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ms_diffusion.training.optim import build_lr_schedule, build_optimizer
from ms_diffusion.training.step import TrainStep

__all__ = ["FashionClassifier", "ClassifierConfig", "train_classifier", "classifier_outputs", "accuracy",
           "save_classifier", "load_classifier", "file_sha256", "CLASSIFIER_KIND", "SHIPPED_CLASSIFIER"]

PathLike = Union[str, "os.PathLike[str]"]

#: ``meta["kind"]`` of a classifier checkpoint written by ``save_classifier``.
CLASSIFIER_KIND = "ms_diffusion.fmnist_classifier"
#: The checkpoint trained on real Fashion-MNIST and shipped with the package.
SHIPPED_CLASSIFIER = Path(__file__).resolve().parent / "weights" / "fmnist_classifier.ckpt"


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture of ``FashionClassifier``: input channels/size, stage widths, classes."""

    in_channels: int = 1
    image_size: int = 28
    widths: Tuple[int, int, int] = (24, 48, 96)
    num_classes: int = 10

    @property
    def feature_dim(self) -> int:
        return int(self.widths[-1])


class _ConvBNReLU(nn.Cell):
    """conv3x3 (no bias) + BatchNorm + ReLU: (B, c_in, H, W) -> (B, c_out, H, W)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = conv2d(c_in, c_out, 3, bias=False)
        self.bn = nn.BatchNorm2d(c_out, momentum=0.9)
        self.relu = nn.ReLU()

    def construct(self, x):
        return self.relu(self.bn(self.conv(x)))


class FashionClassifier(nn.Cell):
    """Small CNN: images (B, C, S, S) in [0, 1] -> logits (B, num_classes); ``features`` -> (B, widths[-1]) >= 0."""

    def __init__(self, config: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        if config.image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4, got {config.image_size}")
        w1, w2, w3 = (int(w) for w in config.widths)
        self.config = config
        self.block1 = _ConvBNReLU(config.in_channels, w1)
        self.block2 = _ConvBNReLU(w1, w2)
        self.block3 = _ConvBNReLU(w2, w2)
        self.block4 = _ConvBNReLU(w2, w3)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.head = dense(w3, config.num_classes)

    def features(self, x: Tensor) -> Tensor:
        """(B, C, S, S) in [0, 1] -> (B, widths[-1]): the globally average-pooled last block."""
        h = self.block1(x * 2.0 - 1.0)
        h = self.block3(self.block2(self.pool(h)))
        h = self.block4(self.pool(h))
        return h.mean(axis=(2, 3))

    def construct(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _check_images(images: np.ndarray, config: ClassifierConfig) -> np.ndarray:
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
    images = _check_images(images, net.config)
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


def train_classifier(images: np.ndarray, labels: np.ndarray, *, config: ClassifierConfig = ClassifierConfig(),
                     epochs: float = 2.0, batch_size: int = 128, lr: float = 2e-3, weight_decay: float = 0.0,
                     seed: int = 0, log_every: int = 100, log: Callable[[str], None] = print,
                     ) -> Tuple[FashionClassifier, List[Tuple[int, float]]]:
    """Train a ``FashionClassifier`` on ``images`` (N, C, S, S) in [0, 1] and int ``labels`` (N,) in [0, classes).

    Adam with a cosine learning-rate decay over ``epochs`` (fractions allowed) of shuffled full
    batches, cross-entropy loss, one compiled train step. The data order is a function of ``seed``.
    Returns the network (eval mode) and the loss history [(step, mean loss over the last steps)].
    """
    images = _check_images(images, config)
    labels = np.asarray(labels).astype(np.int32).reshape(-1)
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= config.num_classes):
        raise ValueError(f"labels must lie in [0, {config.num_classes}), got [{labels.min()}, {labels.max()}]")
    if len(images) < batch_size:
        raise ValueError(f"{len(images)} training images is fewer than one batch of {batch_size}")
    if epochs <= 0:
        raise ValueError(f"epochs must be > 0, got {epochs}")
    ms.set_seed(seed)
    net = FashionClassifier(config)
    net.set_train(True)
    per_epoch = len(images) // batch_size
    total = max(int(math.ceil(epochs * per_epoch)), 1)
    schedule = build_lr_schedule("cosine", lr, warmup_steps=0, total_steps=total + 1, min_lr=lr * 0.01)
    optimizer = build_optimizer(net.trainable_params(), "adam", schedule, betas=(0.9, 0.999),
                                weight_decay=weight_decay)
    loss_cell = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")

    def loss_fn(x, y):
        return loss_cell(net(x), y)

    step_fn = TrainStep(loss_fn, optimizer)
    rng = np.random.default_rng(seed)
    history: List[Tuple[int, float]] = []
    window: List[Tensor] = []
    step, epoch, start = 0, 0, time.perf_counter()
    while step < total:
        order = rng.permutation(len(images))
        for b in range(per_epoch):
            if step >= total:
                break
            idx = order[b * batch_size:(b + 1) * batch_size]
            loss, _, _ = step_fn(Tensor(images[idx]), Tensor(labels[idx]))
            window.append(loss)
            step += 1
            if step % log_every == 0 or step == total:
                mean = float(np.mean([float(v.asnumpy()) for v in window]))
                window.clear()
                history.append((step, mean))
                log(f"step {step}/{total} (epoch {epoch + b / per_epoch:.2f}) loss {mean:.4f} "
                    f"{time.perf_counter() - start:.0f} s")
        epoch += 1
    net.set_train(False)
    return net, history


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
