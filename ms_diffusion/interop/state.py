"""Load named numpy arrays into a Cell, refusing any silent loss of weights."""
from __future__ import annotations

from typing import Dict, Iterable, Mapping, Optional, Sequence

import mindspore as ms
import numpy as np
from mindspore import nn

from ms_diffusion.interop.names import Rule, rename

__all__ = ["ConversionError", "load_arrays_into", "state_arrays", "named_parameters"]


class ConversionError(ValueError):
    """A weight conversion would drop, invent or reshape parameters."""


def named_parameters(cell: nn.Cell) -> Dict[str, ms.Parameter]:
    """{name relative to ``cell``: Parameter}. ``Parameter.name`` is global: MindSpore prefixes it with the
    attribute path once the cell is attached to a parent (``model.`` inside GaussianDiffusion)."""
    return {name: p for name, p in cell.parameters_and_names()}


def state_arrays(cell: nn.Cell) -> Dict[str, np.ndarray]:
    """All parameters of ``cell`` as {name relative to cell: numpy array}."""
    return {name: p.asnumpy() for name, p in named_parameters(cell).items()}


def load_arrays_into(cell: nn.Cell, arrays: Mapping[str, np.ndarray], rules: Sequence[Rule] = (),
                     ignore: Iterable[str] = ()) -> None:
    """Copy ``arrays`` (source names, renamed by ``rules``) into ``cell``'s parameters.

    Raises ConversionError listing missing, unexpected and shape-mismatched names unless every
    parameter is matched exactly once (source names in ``ignore`` are skipped on purpose).
    """
    ignore = set(ignore)
    renamed = {}
    for src, value in arrays.items():
        if src in ignore:
            continue
        dst = rename(src, rules)
        if dst in renamed:
            raise ConversionError(f"two source weights map to {dst!r}")
        renamed[dst] = (src, np.asarray(value))
    params = named_parameters(cell)
    missing = sorted(set(params) - set(renamed))
    unexpected = sorted(src for dst, (src, _) in renamed.items() if dst not in params)
    mismatched = sorted(f"{src} {tuple(v.shape)} -> {dst} {tuple(params[dst].shape)}"
                        for dst, (src, v) in renamed.items() if dst in params and tuple(v.shape) != tuple(params[dst].shape))
    if missing or unexpected or mismatched:
        lines = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                shown = ", ".join(items[:8]) + (f" … (+{len(items) - 8})" if len(items) > 8 else "")
                lines.append(f"{title} ({len(items)}): {shown}")
        raise ConversionError("weights do not match the model; " + "; ".join(lines))
    for dst, (_, value) in renamed.items():
        p = params[dst]
        p.set_data(ms.Tensor(value.astype(ms.dtype_to_nptype(p.dtype))))
