"""State dicts: rename parameter names by rule tables, load named numpy arrays into a Cell refusing any silent
loss of weights."""
from __future__ import annotations

import re
from typing import Callable, Dict, Iterable, Mapping, Sequence, Tuple

import mindspore as ms
import numpy as np
from mindspore import nn

__all__ = ["Rule", "rename", "rename_staged", "ConversionError", "build_uninitialised", "load_arrays_into", "state_arrays",
           "named_parameters", "problem_report", "numpy_dtype"]

_NUMPY_DTYPES = {ms.float32: np.float32, ms.float16: np.float16, ms.float64: np.float64, ms.int32: np.int32,
                 ms.int64: np.int64, ms.int16: np.int16, ms.int8: np.int8, ms.uint8: np.uint8, ms.bool_: np.bool_}


Rule = Tuple[str, str]


def rename(name: str, rules: Sequence[Rule]) -> str:
    """Apply the first matching rule (regex, replacement); names no rule matches are unchanged."""
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return name


def rename_staged(name: str, stages: Sequence[Sequence[Rule]]) -> str:
    """``rename`` through each stage of rules in turn."""
    for rules in stages:
        name = rename(name, rules)
    return name


class ConversionError(ValueError):
    """A weight conversion would drop, invent or reshape parameters."""


def numpy_dtype(param: ms.Parameter) -> np.dtype:
    """The numpy dtype of a Parameter's values (bfloat16, which numpy lacks, reads as float32)."""
    return np.dtype(_NUMPY_DTYPES.get(param.dtype, np.float32))


def named_parameters(cell: nn.Cell) -> Dict[str, ms.Parameter]:
    """{name relative to ``cell``: Parameter}. ``Parameter.name`` is global: MindSpore prefixes it with the
    attribute path once the cell is attached to a parent (``model.`` inside GaussianDiffusion)."""
    return {name: p for name, p in cell.parameters_and_names()}


def state_arrays(cell: nn.Cell) -> Dict[str, np.ndarray]:
    """All parameters of ``cell`` as {name relative to cell: numpy array}."""
    return {name: p.asnumpy() for name, p in named_parameters(cell).items()}


def problem_report(missing: Sequence[str] = (), unexpected: Sequence[str] = (), mismatched: Sequence[str] = (),
                   shown: int = 8) -> str:
    """'missing (n): a, b …; unexpected (m): …; shape mismatch (k): …' for the non-empty lists."""
    lines = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if items:
            text = ", ".join(items[:shown]) + (f" … (+{len(items) - shown})" if len(items) > shown else "")
            lines.append(f"{title} ({len(items)}): {text}")
    return "; ".join(lines)


def build_uninitialised(factory: Callable[..., nn.Cell], *args, **kwargs) -> nn.Cell:
    """``factory(*args, **kwargs)`` with its parameters left uninitialised (MindSpore's
    ``no_init_parameters``) because weights are loaded into them next: no random initialisation of
    weights only to overwrite them (3.2 GB at SD 1.5's UNet). Every parameter must then be set, as
    ``load_arrays_into`` checks."""
    try:
        from mindspore.nn.utils import no_init_parameters
    except ImportError:              # older MindSpore: initialise as usual
        return factory(*args, **kwargs)
    with no_init_parameters():
        return factory(*args, **kwargs)


def load_arrays_into(cell: nn.Cell, arrays: Mapping[str, np.ndarray], rules: Sequence[Rule] = (),
                     ignore: Iterable[str] = (), consume: bool = False) -> None:
    """Copy ``arrays`` (source names, renamed by ``rules``) into ``cell``'s parameters.

    Raises ConversionError listing missing, unexpected and shape-mismatched names unless every
    parameter is matched exactly once (source names in ``ignore`` are skipped on purpose).
    ``consume``: remove each array from ``arrays`` (a dict) once it is copied, so that a state dict the
    caller holds nowhere else is freed while it loads instead of after (SD 1.5's UNet: 3.4 GB).
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
        raise ConversionError("weights do not match the model; " + problem_report(missing, unexpected, mismatched))
    for dst in list(renamed):
        src, value = renamed.pop(dst)
        p = params[dst]
        p.set_data(ms.Tensor(value.astype(numpy_dtype(p), copy=False), dtype=p.dtype))
        if consume:
            del arrays[src], value
