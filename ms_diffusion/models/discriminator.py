"""PatchGAN discriminator (pix2pix ``NLayerDiscriminator`` as used by taming / ldm) and ActNorm.

Parameter paths follow taming: ``main.{i}.weight`` for the convolutions; BatchNorm layers are
MindSpore's (``gamma``, ``beta``, ``moving_mean``, ``moving_variance``; torch ``weight``, ``bias``,
``running_mean``, ``running_var``, ``num_batches_tracked`` dropped); ActNorm keeps taming's
``loc``, ``scale`` and ``initialized``.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from ms_diffusion.nn.layers import conv2d, expand_as

__all__ = ["NLayerDiscriminator", "ActNorm", "weights_init"]


class ActNorm(nn.Cell):
    """Per-channel affine ``scale * (x + loc)`` with data-dependent initialisation (Kingma & Dhariwal 2018).

    The first call in training mode sets ``loc = -mean`` and ``scale = 1 / (std + 1e-6)`` from that
    batch (per channel, unbiased std, as taming) and marks the layer ``initialized``; this also
    works inside a compiled train step. (B, C, H, W) -> same.
    """

    def __init__(self, num_features: int):
        super().__init__()
        self.loc = Parameter(Tensor(np.zeros((1, num_features, 1, 1), np.float32)), name="loc")
        self.scale = Parameter(Tensor(np.ones((1, num_features, 1, 1), np.float32)), name="scale")
        self.initialized = Parameter(Tensor(0, ms.int32), name="initialized", requires_grad=False)

    def construct(self, x):
        if self.training:
            xs = ops.stop_gradient(x).astype(ms.float32)
            n = xs.shape[0] * xs.shape[2] * xs.shape[3]
            mean = xs.mean(axis=(0, 2, 3), keep_dims=True)
            var = ((xs - expand_as(mean, xs)) ** 2).sum(axis=(0, 2, 3), keepdims=True) / max(n - 1, 1)
            done = self.initialized > 0
            loc = ops.select(done, self.loc, -mean)
            scale = ops.select(done, self.scale, 1.0 / (ops.sqrt(var) + 1e-6))
            ops.assign(self.loc, loc)
            ops.assign(self.scale, scale)
            ops.assign(self.initialized, ops.ones_like(self.initialized))
            return expand_as(scale, x) * (x + expand_as(loc, x))
        return expand_as(self.scale, x) * (x + expand_as(self.loc, x))


def weights_init(cell: nn.Cell) -> nn.Cell:
    """taming's init: conv weights ~ N(0, 0.02); BatchNorm gamma ~ N(1, 0.02), beta = 0. Returns ``cell``."""
    for _, sub in cell.cells_and_names():
        if isinstance(sub, nn.Conv2d):
            sub.weight.set_data(initializer(Normal(0.02, 0.0), sub.weight.shape, sub.weight.dtype))
        elif isinstance(sub, nn.BatchNorm2d):
            sub.gamma.set_data(initializer(Normal(0.02, 1.0), sub.gamma.shape, sub.gamma.dtype))
            sub.beta.set_data(ops.zeros(sub.beta.shape, sub.beta.dtype))
    return cell


class NLayerDiscriminator(nn.Cell):
    """PatchGAN: images (B, input_nc, H, W) -> patch logits (B, 1, H', W').

    conv4x4/2 + LeakyReLU(0.2), ``n_layers - 1`` x [conv4x4/2, norm, LeakyReLU], conv4x4/1, norm,
    LeakyReLU, conv4x4/1 -> 1 channel; widths ``ndf * min(2^n, 8)``. Norm is BatchNorm (convs
    before it carry no bias) or ActNorm (``use_actnorm``). For 32x32 inputs and n_layers=3 the
    map is 2x2. ``init_weights`` applies taming's ``weights_init``.
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, use_actnorm: bool = False,
                 init_weights: bool = True):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")

        def norm(c):
            return ActNorm(c) if use_actnorm else nn.BatchNorm2d(c, eps=1e-5, momentum=0.9)

        use_bias = bool(use_actnorm)
        layers = [conv2d(input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2 ** n, 8)
            layers += [conv2d(ndf * prev, ndf * mult, 4, stride=2, padding=1, bias=use_bias), norm(ndf * mult),
                       nn.LeakyReLU(0.2)]
        prev, mult = mult, min(2 ** n_layers, 8)
        layers += [conv2d(ndf * prev, ndf * mult, 4, stride=1, padding=1, bias=use_bias), norm(ndf * mult),
                   nn.LeakyReLU(0.2), conv2d(ndf * mult, 1, 4, stride=1, padding=1)]
        self.main = nn.SequentialCell(layers)
        self.input_nc = input_nc
        if init_weights:
            weights_init(self)

    def construct(self, x):
        return self.main(x)
