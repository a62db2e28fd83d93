"""Training the Fashion-MNIST feature classifier (``models.classifier``) for the offline Fréchet distance."""
from __future__ import annotations

import math
import time
from typing import Callable, List, Tuple

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn

from ms_diffusion.models.classifier import ClassifierConfig, FashionClassifier
from ms_diffusion.training.optim import build_lr_schedule, build_optimizer
from ms_diffusion.training.step import TrainStep

__all__ = ["train_classifier"]


def train_classifier(images: np.ndarray, labels: np.ndarray, *, config: ClassifierConfig = ClassifierConfig(),
                     epochs: float = 2.0, batch_size: int = 128, lr: float = 2e-3, weight_decay: float = 0.0,
                     seed: int = 0, log_every: int = 100, log: Callable[[str], None] = print,
                     ) -> Tuple[FashionClassifier, List[Tuple[int, float]]]:
    """Train a ``FashionClassifier`` on ``images`` (N, C, S, S) in [0, 1] and int ``labels`` (N,) in [0, classes).

    Adam with a cosine learning-rate decay over ``epochs`` (fractions allowed) of shuffled full
    batches, cross-entropy loss, one compiled train step. The data order is a function of ``seed``.
    Returns the network (eval mode) and the loss history [(step, mean loss over the last steps)].
    """
    want = (config.in_channels, config.image_size, config.image_size)
    images = np.asarray(images)
    if images.ndim != 4 or tuple(images.shape[1:]) != want:
        raise ValueError(f"the classifier trains on images of shape (N, {want[0]}, {want[1]}, {want[2]}) in [0, 1]; "
                         f"got {images.shape}")
    images = images.astype(np.float32, copy=False)
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
