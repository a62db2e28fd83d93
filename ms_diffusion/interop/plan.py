"""The conversion engine: one plan per (our network, PyTorch source), used in both directions.

``build_plan(cell, spec)`` walks ``cell`` and maps every parameter through the ``Spec``'s tables
(``names.py``): its PyTorch name(s) and the shape ``Transform`` between them. A ``Plan`` then

* ``to_ms(state)``: PyTorch state dict (numpy arrays) -> {our name: array}; raises
  ``ConversionError`` listing every missing, unexpected and shape-mismatched PyTorch key, and naming
  the first schedule buffer that disagrees with ours (both values) -- nothing is dropped unless
  the table says why (``dropped``);
* ``to_torch(arrays)``: {our name: array} -> PyTorch state dict, refusing to drop any parameter
  PyTorch has no place for unless it still holds its configured value (``fixed``).

Both directions are exact (reshapes and concatenations only), so ms -> torch -> ms is bitwise.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np
from mindspore import nn

from ms_diffusion.interop.names import Spec, rename, rename_staged
from ms_diffusion.io.state import ConversionError, named_parameters, numpy_dtype, problem_report
from ms_diffusion.interop.transforms import IDENTITY, Transform

__all__ = ["Entry", "Plan", "build_plan", "select_prefix"]


@dataclass(frozen=True)
class Entry:
    """One of our parameters and the PyTorch tensor(s) that hold it."""

    ms_name: str
    torch_names: Tuple[str, ...]
    transform: Transform
    ms_shape: Tuple[int, ...]
    ms_dtype: np.dtype


@dataclass
class Plan:
    """How a PyTorch state dict and our parameters correspond (see the module docstring).

    ``dropped``: PyTorch names accepted and ignored on purpose -> why. ``checked``: PyTorch buffers
    that must equal ours (relative tolerance ``rtol``) and are written back on export. ``fixed``:
    our parameters with no PyTorch counterpart -> (configured value, what it is).
    """

    source: str
    entries: List[Entry] = field(default_factory=list)
    dropped: Dict[str, str] = field(default_factory=dict)
    checked: Dict[str, np.ndarray] = field(default_factory=dict)
    fixed: Dict[str, Tuple[np.ndarray, str]] = field(default_factory=dict)
    aliases: Tuple[Tuple[str, str], ...] = ()
    rtol: float = 1e-4
    hint: str = ""

    def extend(self, other: "Plan") -> "Plan":
        """Add ``other``'s entries, dropped names, checked buffers and fixed parameters (returns self)."""
        self.entries.extend(other.entries)
        self.dropped.update(other.dropped)
        self.checked.update(other.checked)
        self.fixed.update(other.fixed)
        self.aliases = tuple(dict.fromkeys(self.aliases + other.aliases))
        self._check_unique()
        return self

    def _check_unique(self) -> None:
        seen: Dict[str, str] = {}
        for e in self.entries:
            for t in e.torch_names:
                if t in seen:
                    raise ConversionError(f"{self.source}: the name table maps both {seen[t]!r} and {e.ms_name!r} "
                                          f"to {t!r}")
                seen[t] = e.ms_name

    @property
    def torch_names(self) -> List[str]:
        return [t for e in self.entries for t in e.torch_names] + list(self.checked)

    # ------------------------------------------------------------------ PyTorch -> ours

    def _apply_aliases(self, state: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        if not self.aliases:
            return dict(state)
        out: Dict[str, np.ndarray] = {}
        for key, value in state.items():
            new = rename(key, self.aliases)
            if new in out:
                raise ConversionError(f"{self.source}: both {key!r} and another key map to {new!r}")
            out[new] = value
        return out

    def to_ms(self, state: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """PyTorch state dict -> {our name: array} (our dtypes), or ConversionError listing every problem."""
        state = self._apply_aliases(state)
        expected = {t for e in self.entries for t in e.torch_names} | set(self.checked)
        unexpected = sorted(k for k in state if k not in expected and k not in self.dropped)
        missing = sorted(t for t in expected if t not in state)
        mismatched = []
        for e in self.entries:
            for t, shape in zip(e.torch_names, e.transform.torch_shapes(e.ms_shape)):
                if t in state and tuple(np.shape(state[t])) != tuple(shape):
                    mismatched.append(f"{t} {tuple(np.shape(state[t]))} (model expects {tuple(shape)})")
        for t, ours in self.checked.items():
            if t in state and tuple(np.shape(state[t])) != ours.shape:
                mismatched.append(f"{t} {tuple(np.shape(state[t]))} (model expects {ours.shape})")
        if missing or unexpected or mismatched:
            hint = f". {self.hint}" if self.hint else ""
            raise ConversionError(f"{self.source} weights do not match the model: "
                                  f"{problem_report(missing, unexpected, sorted(mismatched))}{hint}")
        self.check_buffers(state)
        out = {e.ms_name: e.transform.to_ms([np.asarray(state[t]) for t in e.torch_names]).astype(e.ms_dtype, copy=False)
               for e in self.entries}
        for name, (value, _) in self.fixed.items():
            out[name] = np.array(value, copy=True)
        return out

    def check_buffers(self, state: Mapping[str, np.ndarray]) -> None:
        """Compare the source's schedule buffers with ours; name the first mismatch and both values."""
        for name, ours in self.checked.items():
            theirs = np.asarray(state[name], dtype=np.float64).reshape(ours.shape)
            expected = ours.astype(np.float64)
            bad = ~np.isclose(theirs, expected, rtol=self.rtol, atol=1e-12 + self.rtol * 1e-6, equal_nan=True)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                where = f"[{i}]" if ours.ndim else ""
                raise ConversionError(f"{self.source}: buffer {name!r} does not match this config's schedule: "
                                      f"{name}{where} = {theirs.flat[i]:.9g} in the checkpoint but "
                                      f"{expected.flat[i]:.9g} here"
                                      + (f". {self.hint}" if self.hint else ""))

    # ------------------------------------------------------------------ ours -> PyTorch

    def to_torch(self, arrays: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """{our name: array} -> PyTorch state dict; refuses to drop a changed parameter PyTorch cannot hold."""
        names = {e.ms_name for e in self.entries} | set(self.fixed)
        missing = sorted(names - set(arrays))
        unexpected = sorted(set(arrays) - names)
        if missing or unexpected:
            raise ConversionError(f"cannot export to {self.source}: {problem_report(missing, unexpected)}")
        for name, (value, what) in self.fixed.items():
            if not np.array_equal(np.asarray(arrays[name]), value):
                raise ConversionError(f"cannot export to {self.source}: {name} ({what}) differs from its configured "
                                      f"value and {self.source} has no place for it; refusing to drop it")
        out: Dict[str, np.ndarray] = {}
        for e in self.entries:
            for t, part in zip(e.torch_names, e.transform.to_torch(np.asarray(arrays[e.ms_name]))):
                out[t] = part
        for t, ours in self.checked.items():
            out[t] = np.array(ours, copy=True)
        return out


def _layout_for(spec: Spec, cell: nn.Cell):
    for cls, layout in spec.layouts.items():
        if isinstance(cell, cls):
            return layout
    return None


def build_plan(cell: nn.Cell, spec: Spec, *, ms_prefix: str = "", torch_prefix: str = "",
               exclude: Iterable[str] = (), source: Optional[str] = None) -> Plan:
    """Map every parameter of ``cell`` (names relative to it, minus ``exclude``) through ``spec``.

    ``ms_prefix`` / ``torch_prefix`` are prepended to the resulting names, to place a sub-network
    inside a larger state dict (``model.diffusion_model.``).
    """
    params = named_parameters(cell)
    exclude = set(exclude)
    local: Dict[str, Tuple[Tuple[str, ...], Transform]] = {}
    dropped: Dict[str, str] = {}
    cells = list(cell.cells_and_names())
    for path, sub in cells:
        p = f"{path}." if path else ""
        own = [n for n, _ in sub.parameters_and_names(expand=False)]
        for rule in spec.leaves:
            if isinstance(sub, rule.cell_types):
                for leaf in own:
                    if leaf in rule.names:
                        local[p + leaf] = ((p + rule.names[leaf],), IDENTITY)
                for leaf, why in rule.dropped.items():
                    dropped[p + leaf] = why
                break
    for path, sub in cells:  # layer layouts override the type-implied leaves
        layout = _layout_for(spec, sub)
        if layout:
            p = f"{path}." if path else ""
            for leaf, (torch_leaves, transform) in layout.items():
                if p + leaf in params:
                    local[p + leaf] = (tuple(p + t for t in torch_leaves), transform)
    entries = []
    for name, param in params.items():
        if name in exclude:
            continue
        torch_local, transform = local.get(name, ((name,), IDENTITY))
        torch_names = tuple(torch_prefix + rename_staged(t, spec.rules) for t in torch_local)
        entries.append(Entry(ms_prefix + name, torch_names, transform, tuple(int(s) for s in param.shape),
                             numpy_dtype(param)))
    plan = Plan(source=source or spec.source, entries=entries, aliases=tuple(spec.aliases),
                dropped={torch_prefix + rename_staged(k, spec.rules): v for k, v in dropped.items()})
    plan._check_unique()
    return plan


def select_prefix(state: Mapping[str, np.ndarray], prefix: str) -> Tuple[Dict[str, np.ndarray], List[str]]:
    """(the entries under ``prefix`` with it stripped, the other keys) -- for taking one component out of a
    larger checkpoint on purpose."""
    inside = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return inside, sorted(k for k in state if not k.startswith(prefix))
