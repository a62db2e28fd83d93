"""The FID Inception-v3 network (pool3 features, 2048-d) in MindSpore, as pytorch-fid defines it.

FID is defined with the TensorFlow "2015-12-05" Inception graph. pytorch-fid ports it as
torchvision's Inception-v3 with the FID-specific blocks ``FIDInceptionA``, ``FIDInceptionC``,
``FIDInceptionE_1`` (3x3 average pools that do not count the zero padding, as TensorFlow) and
``FIDInceptionE_2`` (a 3x3 *max* pool in the pool branch), and weights
``pt_inception-2015-12-05-6726825d.pth``. This module is that network; its parameter names are
the torch ones with BatchNorm's ``weight/bias/running_mean/running_var`` renamed to MindSpore's
``gamma/beta/moving_mean/moving_variance``, so ``scripts/convert_fid_inception.py`` converts
either pytorch-fid's weights file or torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``
(same names) into a checkpoint ``load_fid_inception`` reads. The weights cannot be downloaded
by ms_diffusion; see docs/evaluation.md.

Input handling follows pytorch-fid's ``InceptionV3`` (resize_input=True, normalize_input=True):
images (B, 3, H, W) in [0, 1] are resized to 299x299 bilinearly (``align_corners=False``) and
mapped to [-1, 1]; one-channel images are repeated to three channels first. (torch-fidelity and
the original TensorFlow code resize with TensorFlow 1's bilinear rule instead, so their FID on
images that are not 299x299 differs slightly from pytorch-fid's and ours.)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

import numpy as np
from mindspore import Tensor, nn, ops

from ms_diffusion.io.state import ConversionError, load_arrays_into, named_parameters
from ms_diffusion.runtime import maybe_jit
from ms_diffusion.io.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

__all__ = ["InceptionV3FID", "BasicConv2d", "convert_fid_inception_state_dict", "load_fid_inception",
           "save_fid_inception", "inception_features", "INCEPTION_KIND", "FID_INPUT_SIZE", "FID_FEATURE_DIM"]

PathLike = Union[str, "os.PathLike[str]"]
IntPair = Union[int, Tuple[int, int]]

INCEPTION_KIND = "ms_diffusion.fid_inception_v3"
FID_INPUT_SIZE = 299
FID_FEATURE_DIM = 2048
_BN_RENAMES = (("bn.weight", "bn.gamma"), ("bn.bias", "bn.beta"), ("bn.running_mean", "bn.moving_mean"),
               ("bn.running_var", "bn.moving_variance"))


def _pair(v: IntPair) -> Tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class BasicConv2d(nn.Cell):
    """conv (no bias) + BatchNorm (eps 1e-3) + ReLU: (B, c_in, H, W) -> (B, c_out, H', W').

    ``kernel_size``/``padding`` may be (h, w) pairs (Inception's 1x7 / 7x1 convolutions).
    """

    def __init__(self, c_in: int, c_out: int, kernel_size: IntPair, stride: int = 1, padding: IntPair = 0):
        super().__init__()
        ph, pw = _pair(padding)
        # explicit pad mode and bias: MindSpore's nn.Conv2d defaults are pad_mode="same", no bias
        self.conv = nn.Conv2d(c_in, c_out, _pair(kernel_size), stride=stride, pad_mode="pad",
                              padding=(ph, ph, pw, pw), has_bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)
        self.relu = nn.ReLU()

    def construct(self, x):
        return self.relu(self.bn(self.conv(x)))


def _avg_pool_same(x):
    """3x3 average pool, stride 1, padding 1, padded zeros not counted (TensorFlow's rule)."""
    return ops.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


class FIDInceptionA(nn.Cell):
    """Mixed_5b/5c/5d: (B, c_in, 35, 35) -> (B, 224 + pool_features, 35, 35)."""

    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def construct(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_same(x))
        return ops.cat((b1, b5, b3, bp), 1)


class InceptionB(nn.Cell):
    """Mixed_6a: (B, c_in, 35, 35) -> (B, 480 + c_in, 17, 17)."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2)

    def construct(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return ops.cat((b3, bd, self.pool(x)), 1)


class FIDInceptionC(nn.Cell):
    """Mixed_6b..6e: (B, 768, 17, 17) -> (B, 768, 17, 17) with 7x7 factorised into 1x7 / 7x1."""

    def __init__(self, c_in: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def construct(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        bd = self.branch7x7dbl_3(self.branch7x7dbl_2(bd))
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(bd))
        bp = self.branch_pool(_avg_pool_same(x))
        return ops.cat((b1, b7, bd, bp), 1)


class InceptionD(nn.Cell):
    """Mixed_7a: (B, 768, 17, 17) -> (B, 1280, 8, 8)."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2)

    def construct(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return ops.cat((b3, b7, self.pool(x)), 1)


class FIDInceptionE(nn.Cell):
    """Mixed_7b (``max_pool=False``: FIDInceptionE_1) and Mixed_7c (``max_pool=True``: FIDInceptionE_2).

    (B, c_in, 8, 8) -> (B, 2048, 8, 8). The FID graph's last block pools with a 3x3 max pool where
    torchvision averages; the first averages without counting padding.
    """

    def __init__(self, c_in: int, max_pool: bool):
        super().__init__()
        self.max_pool = bool(max_pool)
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, 1)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=1, pad_mode="pad", padding=1)

    def construct(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = ops.cat((self.branch3x3_2a(b3), self.branch3x3_2b(b3)), 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = ops.cat((self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)), 1)
        pooled = self.pool(x) if self.max_pool else _avg_pool_same(x)
        return ops.cat((b1, b3, bd, self.branch_pool(pooled)), 1)


class InceptionV3FID(nn.Cell):
    """FID Inception-v3 up to pool3: images (B, 1 or 3, H, W) in [0, 1] -> features (B, 2048) >= 0."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
        self.set_train(False)

    def trunk(self, x: Tensor) -> Tensor:
        """(B, 3, 299, 299) already in [-1, 1] -> (B, 2048): the network after input handling."""
        x = self.maxpool1(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))))
        x = self.maxpool2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6a(x)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        return x.mean(axis=(2, 3))

    def preprocess(self, x: Tensor) -> Tensor:
        """(B, 1 or 3, H, W) in [0, 1] -> (B, 3, 299, 299) in [-1, 1] (pytorch-fid's resize and scaling)."""
        if x.shape[1] == 1:
            x = ops.tile(x, (1, 3, 1, 1))
        x = ops.interpolate(x, size=(FID_INPUT_SIZE, FID_INPUT_SIZE), mode="bilinear", align_corners=False)
        return x * 2.0 - 1.0

    def construct(self, x: Tensor) -> Tensor:
        return self.trunk(self.preprocess(x))


def convert_fid_inception_state_dict(state: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """torch names/arrays of the FID Inception (pytorch-fid or torch-fidelity file) -> ours.

    Drops what pool3 features do not use: ``fc.*`` (the 1008-way logits), ``AuxLogits.*`` and
    BatchNorm's ``num_batches_tracked``.
    """
    out = {}
    for name, value in state.items():
        if name.startswith(("fc.", "AuxLogits.")) or name.endswith("num_batches_tracked"):
            continue
        new = name
        for old, repl in _BN_RENAMES:
            if new.endswith(old):
                new = new[: -len(old)] + repl
                break
        out[new] = np.asarray(value, dtype=np.float32)
    return out


def save_fid_inception(net: InceptionV3FID, path: PathLike, meta: Optional[Dict] = None) -> Path:
    """Atomically write the network's weights with ``meta`` (e.g. the source file's SHA-256)."""
    return save_checkpoint(path, named_parameters(net), {"kind": INCEPTION_KIND, **(meta or {})})


def load_fid_inception(path: PathLike) -> Tuple[InceptionV3FID, Dict]:
    """The network with weights from a checkpoint written by ``scripts/convert_fid_inception.py``.

    Returns (network in eval mode, metadata incl. ``path``). CheckpointError with the fix when the
    file is missing or is something else.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"FID Inception weights {str(p)!r} do not exist; convert pytorch-fid's "
                              f"pt_inception-2015-12-05-6726825d.pth with scripts/convert_fid_inception.py "
                              f"(see docs/evaluation.md)")
    arrays, meta = load_checkpoint(p)
    if meta.get("kind") != INCEPTION_KIND:
        raise CheckpointError(f"{p} is not a converted FID Inception checkpoint (kind {meta.get('kind')!r}); "
                              f"make one with scripts/convert_fid_inception.py")
    net = InceptionV3FID()
    try:
        load_arrays_into(net, arrays)
    except ConversionError as err:
        raise CheckpointError(f"{p}: {err}") from None
    net.set_train(False)
    return net, dict(meta, path=str(p))


def inception_features(net: InceptionV3FID, images: np.ndarray, batch_size: int = 50) -> np.ndarray:
    """pool3 features (N, 2048) float32 of images (N, 1 or 3, H, W) in [0, 1], in fixed-size batches."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"the FID Inception network takes images (N, 1 or 3, H, W) in [0, 1], got {images.shape}")
    net.set_train(False)
    n = len(images)
    if n == 0:
        return np.zeros((0, FID_FEATURE_DIM), np.float32)
    bs = min(int(batch_size), n)
    fwd = getattr(net, "_ms_diffusion_forward", None)
    if fwd is None:
        def forward(x):
            return net(x)

        fwd = maybe_jit(forward)
        object.__setattr__(net, "_ms_diffusion_forward", fwd)
    out = []
    for start in range(0, n, bs):
        chunk = images[start:start + bs]
        keep = len(chunk)
        if keep < bs:
            chunk = np.concatenate([chunk, np.zeros((bs - keep,) + chunk.shape[1:], np.float32)])
        out.append(fwd(Tensor(chunk)).asnumpy()[:keep])
    return np.concatenate(out)
