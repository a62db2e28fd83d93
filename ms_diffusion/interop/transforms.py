"""How one MindSpore parameter is stored in a PyTorch state dict, as data.

A ``Transform`` says how many PyTorch tensors hold one of our parameters and how their shapes
relate; it converts both ways without loss (so ms -> torch -> ms is bitwise exact):

==================  =================================  =====================================================
transform           PyTorch                            ms_diffusion
==================  =================================  =====================================================
``IDENTITY``        any tensor                         the same shape
``CONV1D``          Conv1d weight (O, I, 1)            1x1 Conv2d weight (O, I, 1, 1) (ldm AttentionBlock)
``LINEAR``          Linear weight (O, I)               1x1 Conv2d weight (O, I, 1, 1) (diffusers attention)
``FUSED_QKV``       three Linear weights (C, I) each   one 1x1 Conv2d weight (3C, I, 1, 1), rows [q; k; v]
``FUSED_QKV_BIAS``  three biases (C,) each             one bias (3C,)
``FUSED_LINEAR``    three Linear weights (C, I) each   one Dense weight (3C, I), rows [q; k; v] (CLIP text)
``TRANSPOSED``      a (I, O) matrix used as x @ W      a Dense weight (O, I) (OpenCLIP ``text_projection``)
==================  =================================  =====================================================

Leaf renames that follow from a layer's type (GroupNorm/LayerNorm ``weight``/``bias`` <->
``gamma``/``beta``, BatchNorm running statistics, ``nn.Embedding``) live in ``names.TORCH_LEAVES``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np

__all__ = ["Transform", "IDENTITY", "CONV1D", "LINEAR", "FUSED_QKV", "FUSED_QKV_BIAS", "FUSED_LINEAR", "TRANSPOSED"]

Shape = Tuple[int, ...]


@dataclass(frozen=True)
class Transform:
    """``parts`` PyTorch tensors <-> one MindSpore array; ``trailing`` unit axes exist only on our side.

    The MindSpore array is the PyTorch tensors concatenated along axis 0 (``parts > 1``), with
    ``trailing`` extra axes of size 1 appended; ``transpose``: a single 2-D tensor stored transposed.
    """

    name: str
    parts: int = 1
    trailing: int = 0
    transpose: bool = False

    def torch_shapes(self, ms_shape: Sequence[int]) -> List[Shape]:
        """The PyTorch shapes that make a MindSpore parameter of ``ms_shape``."""
        shape = tuple(int(s) for s in ms_shape)
        if self.transpose:
            return [shape[::-1]]
        if self.trailing:
            if len(shape) < self.trailing or any(s != 1 for s in shape[-self.trailing:]):
                raise ValueError(f"transform {self.name}: MindSpore shape {shape} does not end in {self.trailing} "
                                 f"unit axes")
            shape = shape[:-self.trailing]
        if self.parts > 1:
            if not shape or shape[0] % self.parts:
                raise ValueError(f"transform {self.name}: MindSpore shape {shape} does not split into {self.parts}")
            shape = (shape[0] // self.parts,) + shape[1:]
        return [shape] * self.parts

    def to_ms(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """PyTorch tensors (as numpy) -> our array."""
        if len(arrays) != self.parts:
            raise ValueError(f"transform {self.name} takes {self.parts} tensors, got {len(arrays)}")
        if self.transpose:
            return np.ascontiguousarray(np.asarray(arrays[0]).T)
        out = np.concatenate(arrays, axis=0) if self.parts > 1 else np.asarray(arrays[0])
        return out.reshape(out.shape + (1,) * self.trailing) if self.trailing else out

    def to_torch(self, array: np.ndarray) -> List[np.ndarray]:
        """Our array -> PyTorch tensors (as numpy), in the order of the entry's PyTorch names."""
        a = np.asarray(array)
        if self.transpose:
            return [np.ascontiguousarray(a.T)]
        if self.trailing:
            a = a.reshape(a.shape[:-self.trailing])
        return [np.ascontiguousarray(p) for p in np.split(a, self.parts, axis=0)] if self.parts > 1 else [a]


IDENTITY = Transform("identity")
CONV1D = Transform("conv1d", trailing=1)
LINEAR = Transform("linear", trailing=2)
FUSED_QKV = Transform("fused_qkv", parts=3, trailing=2)
FUSED_QKV_BIAS = Transform("fused_qkv_bias", parts=3)
FUSED_LINEAR = Transform("fused_linear", parts=3)
TRANSPOSED = Transform("transposed", transpose=True)
