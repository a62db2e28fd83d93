"""2-D convolution (any kernel size, stride, padding, dilation, groups) on our oneDNN kernels.

``Conv2dOp(...)(x, w, b)`` equals ``ops.conv2d(x, w, b, ...)`` with ``pad_mode="pad"``, forward and
backward (the backward is two more kernels: data and weights + bias). Shapes: x (N, C, H, W) fp32, w
(O, C / groups, kh, kw), b (O,) or None; out (N, O, Ho, Wo).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np

import mindspore as ms
from mindspore import Tensor, ops

from ms_diffusion.kernels import require_library

__all__ = ["Conv2dOp"]

IntPair = Union[int, Sequence[int]]


def _pair(v: IntPair) -> Tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, (int, np.integer)) else (int(v[0]), int(v[1]))


def _padding(p: Union[int, Sequence[int]]) -> Tuple[int, int, int, int]:
    """(top, bottom, left, right), MindSpore's order for a 4-tuple; an int pads all sides."""
    if isinstance(p, (int, np.integer)):
        return (int(p),) * 4
    p = tuple(int(v) for v in p)
    if len(p) == 2:
        return (p[0], p[0], p[1], p[1])
    if len(p) == 4:
        return p
    raise ValueError(f"padding must be an int, a pair or (top, bottom, left, right), not {p}")


#: MindSpore keeps one shape inference per Custom function name; the forward's output shape depends on
#: the settings, so each distinct setting gets its own exported alias (``Conv2d_<k>``, ``Conv2dBias_<k>``).
ALIASES = 64
_aliases: Dict[Tuple[int, ...], int] = {}


def _alias(settings: Tuple[int, ...]) -> str:
    if settings not in _aliases:
        if len(_aliases) >= ALIASES:
            raise RuntimeError(f"more than {ALIASES} distinct convolution settings in one process")
        _aliases[settings] = len(_aliases)
    k = _aliases[settings]
    return f"{k // 8}{k % 8}"     # the library's names: two octal digits, 00 to 77


def available(stride: IntPair = 1, padding: Union[int, Sequence[int]] = 0, dilation: IntPair = 1,
              groups: int = 1) -> bool:
    """Whether a layer with these settings can have a kernel (an alias is free, or already its own)."""
    key = (*_pair(stride), *_padding(padding), *_pair(dilation), int(groups))
    return key in _aliases or len(_aliases) < ALIASES


class Conv2dOp:
    """The forward Custom primitive (with its backward attached) and its settings tensor.

    Call it as ``op.prim(x, w, b, op.spec)`` (``op.prim(x, w, op.spec)`` without bias) inside a Cell's
    ``construct``: graph mode takes primitives and tensors held as attributes, not arbitrary callables.
    The backward's primitives are ``backward_data(dy, w, x, spec) -> dx`` and
    ``backward_weights(x, dy, w, spec) -> dw`` (``(dw, db)`` with bias).
    """

    def __init__(self, stride: IntPair = 1, padding: Union[int, Sequence[int]] = 0, dilation: IntPair = 1,
                 groups: int = 1, has_bias: bool = True, lib: Optional[str] = None):
        lib = require_library(lib)
        sh, sw = _pair(stride)
        top, bottom, left, right = _padding(padding)
        dh, dw = _pair(dilation)
        self.spec = Tensor(np.array([sh, sw, top, left, bottom, right, dh, dw, groups], np.int64))

        def out_size(size: int, k: int, axis: int) -> int:
            pad = (top + bottom, left + right)[axis]
            d, s = (dh, dw)[axis], (sh, sw)[axis]
            return (size + pad - d * (k - 1) - 1) // s + 1

        def forward_shape(x, w, *rest):
            return [x[0], w[0], out_size(x[2], w[2], 0), out_size(x[3], w[3], 1)]

        f32 = ms.float32
        alias = _alias((sh, sw, top, bottom, left, right, dh, dw, groups))
        data = ops.Custom(f"{lib}:Conv2dBackwardData", out_shape=lambda dy, w, x, spec: list(x), out_dtype=f32,
                          func_type="aot")
        if has_bias:
            weights = ops.Custom(f"{lib}:Conv2dBackwardWeightsBias",
                                 out_shape=lambda x, dy, w, spec: ([w[0], w[1], w[2], w[3]], [w[0]]),
                                 out_dtype=(f32, f32), func_type="aot")

            def bprop(x, w, b, spec, out, dout):
                dw, db = weights(x, dout, w, spec)
                return data(dout, w, x, spec), dw, db, ops.zeros_like(spec)
        else:
            weights = ops.Custom(f"{lib}:Conv2dBackwardWeights", out_shape=lambda x, dy, w, spec: list(w),
                                 out_dtype=f32, func_type="aot")

            def bprop(x, w, spec, out, dout):
                return data(dout, w, x, spec), weights(x, dout, w, spec), ops.zeros_like(spec)

        self.backward_data, self.backward_weights = data, weights
        self.prim = ops.Custom(f"{lib}:{'Conv2dBias' if has_bias else 'Conv2d'}_{alias}", out_shape=forward_shape,
                               out_dtype=f32, func_type="aot", bprop=bprop)
        self.has_bias = has_bias

    def __call__(self, x: Tensor, w: Tensor, b: Optional[Tensor] = None) -> Tensor:
        """PyNative convenience; Cells call ``self.prim`` directly."""
        return self.prim(x, w, b, self.spec) if self.has_bias else self.prim(x, w, self.spec)
