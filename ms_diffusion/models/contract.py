"""The contract between a diffusion and its denoising network, written once.

A network a diffusion (``GaussianDiffusion``, ``LatentDiffusion``) can train and sample is a Cell with

* ``channels: int`` - channels C of the data it denoises (images or latents);
* ``out_dim: int`` - channels of its output: C, or 2C when it also predicts a variance;
* ``construct(x, t, x_self_cond=None, classes=None) -> (B, out_dim, H, W)`` - x (B, C, H, W) noisy
  data in model space, t (B,) int timesteps, x_self_cond (B, C, H, W) or None, classes the
  conditioning (class labels (B,) int in [0, num_classes], num_classes being the null class, or
  another conditioning the network understands) or None;

and optionally (the defaults apply when absent)

* ``self_condition: bool = False`` - it takes the previous x0 estimate as ``x_self_cond``;
* ``num_classes: Optional[int] = None`` - class-conditional with labels in [0, num_classes);
* ``cond_drop_prob: float`` - label dropout probability in training (required with num_classes);
* ``check_input_shape(shape) -> None`` - raises ValueError for data shapes it cannot take.

``Unet`` (either block type) satisfies it; ``UNetModel`` does through ``LatentDenoiser``.
"""
from __future__ import annotations

from numbers import Integral
from typing import Any, Optional, Protocol, runtime_checkable

__all__ = ["DenoiserNetwork", "check_denoiser_network"]


@runtime_checkable
class DenoiserNetwork(Protocol):
    """The required members (``isinstance`` checks that they exist); see the module docstring for the rest."""

    channels: int
    out_dim: int

    def construct(self, x: Any, t: Any, x_self_cond: Optional[Any] = None, classes: Optional[Any] = None) -> Any:
        ...


def _fail(model, where: str, problem: str) -> None:
    raise ValueError(f"{where} cannot use {type(model).__name__} as its denoising network: {problem}. A network "
                     f"needs `channels`, `out_dim` and construct(x, t, x_self_cond=None, classes=None) (as "
                     f"ms_diffusion.Unet has; wrap other networks the way LatentDenoiser wraps UNetModel); see "
                     f"ms_diffusion.models.contract")


def _positive_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool) and value >= 1


def check_denoiser_network(model: Any, where: str = "GaussianDiffusion") -> None:
    """Raise ValueError naming the missing or invalid member if ``model`` breaks the contract."""
    for name in ("channels", "out_dim"):
        if not hasattr(model, name):
            _fail(model, where, f"it has no `{name}` attribute")
        if not _positive_int(getattr(model, name)):
            _fail(model, where, f"`{name}` must be a positive int, got {getattr(model, name)!r}")
    if not callable(getattr(model, "construct", None)):
        _fail(model, where, "it has no construct(x, t, x_self_cond, classes) method")
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None:
        if not _positive_int(num_classes):
            _fail(model, where, f"`num_classes` must be a positive int or None, got {num_classes!r}")
        prob = getattr(model, "cond_drop_prob", None)
        if prob is None:
            _fail(model, where, "it is class-conditional (`num_classes`) but has no `cond_drop_prob` "
                                "(the label dropout probability for classifier-free guidance)")
        if not 0.0 <= float(prob) <= 1.0:
            _fail(model, where, f"`cond_drop_prob` must lie in [0, 1], got {prob!r}")
    check = getattr(model, "check_input_shape", None)
    if check is not None and not callable(check):
        _fail(model, where, "`check_input_shape` must be a method")
