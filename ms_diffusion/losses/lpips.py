"""LPIPS (Zhang et al. 2018), VGG16 variant, as the ``lpips`` package / taming compute it.

d(x0, x1) = sum_l mean_hw( w_l . (f_l(x0)/|f_l(x0)| - f_l(x1)/|f_l(x1)|)^2 ), f_l the VGG16
activations relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of the inputs shifted and scaled by
the "scaling layer"; images (B, 3, H, W) in [-1, 1]; output (B, 1, 1, 1).

Weights cannot be downloaded here. Convert them once with ``scripts/convert_lpips_weights.py``
(the ``lpips`` package's ``weights/v0.1/vgg.pth`` 1x1 "lin" layers plus torchvision's ImageNet
VGG16 ``vgg16-397923af.pth``) and pass the checkpoint to ``LPIPS.from_checkpoint``. Parameter
names are lpips's: ``net.slice{1..5}.{i}.weight`` keeps torchvision's ``features.{i}`` index and
``lin{k}.model.1.weight`` the index after lpips's (inactive) dropout; the scaling layer's
shift/scale are constants, not parameters.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Dict, Mapping

import numpy as np
from mindspore import Tensor, nn, ops

from ms_diffusion.io.ms_checkpoint_io import read_ms_checkpoint_entries
from ms_diffusion.io.safetensors_io import read_safetensors
from ms_diffusion.nn.layers import Identity, conv2d, expand_as

__all__ = ["LPIPS", "VGG16Features", "convert_lpips_state_dict", "LPIPS_CHANNELS", "VGG16_SLICES"]

LPIPS_CHANNELS = (64, 128, 256, 512, 512)
# torchvision vgg16().features: conv3x3+ReLU blocks ("M" = 2x2 max pool); indices 0..29 are used
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
VGG16_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))   # [start, end) of features per slice
_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32).reshape(1, 3, 1, 1)
_SCALE = np.array([0.458, 0.448, 0.450], np.float32).reshape(1, 3, 1, 1)


def _vgg16_layers():
    """(index, kind, in, out) for torchvision's VGG16 feature layers 0..29."""
    layers, c_in, idx = [], 3, 0
    for v in _VGG16_CFG:
        if v == "M":
            layers.append((idx, "pool", None, None))
            idx += 1
        else:
            layers.append((idx, "conv", c_in, v))
            layers.append((idx + 1, "relu", None, None))
            c_in, idx = v, idx + 2
    return layers


class VGG16Features(nn.Cell):
    """VGG16 convolutional trunk split into lpips's five slices. (B, 3, H, W) -> 5 feature maps."""

    def __init__(self):
        super().__init__()
        layers = _vgg16_layers()
        for s, (start, end) in enumerate(VGG16_SLICES, start=1):
            cells = OrderedDict()
            for idx, kind, c_in, c_out in layers:
                if start <= idx < end:
                    if kind == "conv":
                        cells[str(idx)] = conv2d(c_in, c_out, 3)
                    elif kind == "relu":
                        cells[str(idx)] = nn.ReLU()
                    else:
                        cells[str(idx)] = nn.MaxPool2d(kernel_size=2, stride=2)
            setattr(self, f"slice{s}", nn.SequentialCell(cells))

    def construct(self, x):
        h1 = self.slice1(x)
        h2 = self.slice2(h1)
        h3 = self.slice3(h2)
        h4 = self.slice4(h3)
        h5 = self.slice5(h4)
        return h1, h2, h3, h4, h5


class NetLinLayer(nn.Cell):
    """lpips's 1x1 conv C -> 1 without bias; ``model.0`` stands for lpips's dropout (inactive in eval)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.SequentialCell([Identity(), conv2d(channels, 1, 1, bias=False)])

    def construct(self, x):
        return self.model(x)


def _normalize_channels(x, eps: float = 1e-10):
    return x / expand_as(ops.sqrt((x * x).sum(axis=1, keepdims=True)) + eps, x)


class LPIPS(nn.Cell):
    """Perceptual distance: (B, 3, H, W) x2 in [-1, 1] -> (B, 1, 1, 1) >= 0. Frozen (no trainable parameters)."""

    def __init__(self):
        super().__init__()
        self.shift = Tensor(_SHIFT)
        self.scale = Tensor(_SCALE)
        self.net = VGG16Features()
        for k, c in enumerate(LPIPS_CHANNELS):
            setattr(self, f"lin{k}", NetLinLayer(c))
        for p in self.get_parameters():
            p.requires_grad = False
        self.set_train(False)

    @classmethod
    def from_checkpoint(cls, path: str) -> "LPIPS":
        """Load a checkpoint written by ``scripts/convert_lpips_weights.py`` (every parameter required)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"LPIPS checkpoint {path!r} not found; convert the lpips/VGG16 weights with "
                                    f"scripts/convert_lpips_weights.py")
        if path.endswith(".safetensors"):
            arrays = read_safetensors(path)[0]
        else:
            arrays = read_ms_checkpoint_entries(path)
        model = cls()
        model.load_arrays(arrays)
        return model

    def load_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Set every parameter from ``{name: array}``; raise ValueError on missing, unexpected or mis-shaped keys."""
        own = dict(self.parameters_and_names())   # names relative to this cell, wherever it is attached
        missing = sorted(set(own) - set(arrays))
        unexpected = sorted(set(arrays) - set(own))
        if missing or unexpected:
            raise ValueError(f"LPIPS weights do not match the network: missing {missing[:6]}"
                             f"{' ...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}"
                             f"{' ...' if len(unexpected) > 6 else ''}")
        for name, p in own.items():
            value = np.asarray(arrays[name], np.float32)
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"LPIPS weight {name} has shape {value.shape}, expected {tuple(p.shape)}")
            p.set_data(Tensor(value))

    def construct(self, in0, in1):
        shift, scale = expand_as(self.shift, in0), expand_as(self.scale, in0)
        f0 = self.net((in0 - shift) / scale)
        f1 = self.net((in1 - shift) / scale)
        lins = (self.lin0, self.lin1, self.lin2, self.lin3, self.lin4)
        val = 0.0
        for k in range(len(LPIPS_CHANNELS)):
            d = _normalize_channels(f0[k]) - _normalize_channels(f1[k])
            val = val + lins[k](d * d).mean(axis=(2, 3), keep_dims=True)
        return val


def convert_lpips_state_dict(*state_dicts: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Merge PyTorch LPIPS / VGG16 state dicts (as numpy arrays) into ``LPIPS`` parameter names.

    Accepts the ``lpips`` package's ``vgg.pth`` (``lin{k}.model.1.weight``), a full ``lpips.LPIPS``
    / taming state dict (``net.slice{s}.{i}.*``, ``lin*`` and their ``lins.{k}`` aliases; the
    ``scaling_layer.*`` buffers are checked against our constants and dropped) and torchvision's
    VGG16 (``features.{i}.*``; ``classifier.*`` dropped). Raises ValueError on keys it does not know.
    """
    slice_of = {}
    for s, (start, end) in enumerate(VGG16_SLICES, start=1):
        for i in range(start, end):
            slice_of[i] = s
    out: Dict[str, np.ndarray] = {}
    for sd in state_dicts:
        for key, value in sd.items():
            value = np.asarray(value)
            if key.startswith("classifier."):
                continue
            if key.startswith("scaling_layer."):
                expected = _SHIFT if key.endswith("shift") else _SCALE
                if not np.allclose(value.reshape(expected.shape), expected, atol=1e-6):
                    raise ValueError(f"{key} differs from LPIPS's constants; this is not an LPIPS v0.1 checkpoint")
                continue
            if key.startswith("lin") and ".model." in key:
                if key.startswith("lins."):   # lpips.LPIPS registers each lin layer twice (lin{k} and lins.{k})
                    key = "lin" + key[len("lins."):]
                if key in out and not np.array_equal(out[key], value):
                    raise ValueError(f"two different weights for {key!r}")
                out[key] = value.astype(np.float32)
                continue
            parts = key.split(".")
            if parts[0] == "features" and len(parts) == 3 and parts[1].isdigit():
                idx = int(parts[1])
                if idx not in slice_of:
                    continue  # the last max pool has no parameters; nothing else lies beyond index 29
                out[f"net.slice{slice_of[idx]}.{idx}.{parts[2]}"] = value.astype(np.float32)
                continue
            if parts[0] == "net" and len(parts) == 4 and parts[1].startswith("slice"):
                out[key] = value.astype(np.float32)
                continue
            raise ValueError(f"unknown LPIPS/VGG16 weight {key!r}")
    return out
