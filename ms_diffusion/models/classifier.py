"""The small Fashion-MNIST CNN whose penultimate layer is the offline evaluation feature space (``metrics.classifier``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

from mindspore import Tensor, nn

from ms_diffusion.nn.layers import conv2d, dense

__all__ = ["ClassifierConfig", "FashionClassifier"]


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
