"""Exponential moving average of a network's weights into a second copy of the network.

Two warm-ups, as the anchors do:
* ``"inv_gamma"`` (lucidrains' ema-pytorch): decay = 1 - (1 + k / inv_gamma) ** -power, clamped to
  [min_decay, decay], k = updates after ``update_after_step``; before that the copy just tracks the
  online weights. Updated every ``update_every`` training steps.
* ``"ldm"`` (latent-diffusion LitEma): decay = min(decay, (1 + n) / (10 + n)), n = updates so far.
* ``"none"``: a fixed decay.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from ms_diffusion.runtime import maybe_jit

__all__ = ["EMA", "EMA_WARMUPS"]

EMA_WARMUPS = ("inv_gamma", "ldm", "none")

_lerp = ops.MultitypeFuncGraph("ema_lerp")
_copy = ops.MultitypeFuncGraph("ema_copy")


@_lerp.register("Tensor", "Tensor", "Tensor")
def _lerp_one(decay, shadow, online):
    return ops.assign(shadow, shadow - (1.0 - decay) * (shadow - online))


@_copy.register("Tensor", "Tensor")
def _copy_one(shadow, online):
    return ops.assign(shadow, online)


class EMA:
    """Keeps ``shadow``'s parameters an EMA of ``online``'s (matched by name relative to each cell).

    ``step`` counts calls to ``update`` (one per optimizer update) and is saved with checkpoints.
    """

    def __init__(self, online: nn.Cell, shadow: nn.Cell, *, decay: float = 0.9999, warmup: str = "inv_gamma",
                 inv_gamma: float = 1.0, power: float = 2.0 / 3.0, min_decay: float = 0.0,
                 update_after_step: int = 100, update_every: int = 10):
        if warmup not in EMA_WARMUPS:
            raise ValueError(f"unknown ema warmup {warmup!r}; choose one of {EMA_WARMUPS}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must lie in [0, 1), got {decay}")
        self.decay, self.warmup = float(decay), warmup
        self.inv_gamma, self.power, self.min_decay = float(inv_gamma), float(power), float(min_decay)
        self.update_after_step = int(update_after_step) if warmup == "inv_gamma" else 0
        self.update_every = max(int(update_every), 1) if warmup == "inv_gamma" else 1
        self.step = 0
        # both copies' parameters meet in one compiled graph: their global names must differ
        if any(not p.name.startswith("ema.") for p in shadow.get_parameters()):
            shadow.update_parameters_name("ema.")
        online_params = dict(online.parameters_and_names())
        shadow_params = dict(shadow.parameters_and_names())
        pairs: List[Tuple[Parameter, Parameter]] = []
        buffers: List[Tuple[Parameter, Parameter]] = []
        for name, p in online_params.items():
            if name not in shadow_params or tuple(shadow_params[name].shape) != tuple(p.shape):
                raise ValueError(f"EMA copy has no parameter matching {name!r} {tuple(p.shape)}")
            # trainable weights are averaged; the rest (e.g. a measured latent scale_factor, a fixed
            # logvar) is copied as is, like ema-pytorch's buffers
            (pairs if p.requires_grad else buffers).append((shadow_params[name], p))
            shadow_params[name].requires_grad = False
        self.shadow_params = ms.ParameterTuple([s for s, _ in pairs])
        self.online_params = ms.ParameterTuple([o for _, o in pairs])
        self.shadow_buffers = ms.ParameterTuple([s for s, _ in buffers])
        self.online_buffers = ms.ParameterTuple([o for _, o in buffers])
        self._hyper = ops.HyperMap()
        self._lerp_fn = maybe_jit(self._lerp_all)
        self._copy_fn = maybe_jit(self._copy_all)

    def _lerp_all(self, decay):
        if self.shadow_buffers:
            self._hyper(_copy, self.shadow_buffers, self.online_buffers)
        return self._hyper(ops.partial(_lerp, decay), self.shadow_params, self.online_params)

    def _copy_all(self):
        if self.shadow_buffers:
            self._hyper(_copy, self.shadow_buffers, self.online_buffers)
        return self._hyper(_copy, self.shadow_params, self.online_params)

    def current_decay(self, updates: int) -> float:
        """Decay of the update that brings the count of ``update`` calls to ``updates`` (both anchors
        evaluate their warm-up after incrementing their counter)."""
        if self.warmup == "none":
            return self.decay
        if self.warmup == "ldm":
            return min(self.decay, (1.0 + updates) / (10.0 + updates))
        k = updates - self.update_after_step - 1
        if k <= 0:
            return 0.0
        value = 1.0 - (1.0 + k / self.inv_gamma) ** -self.power
        return min(max(value, self.min_decay), self.decay)

    def update(self) -> None:
        step = self.step
        self.step += 1
        if step % self.update_every:
            return
        if self.warmup == "inv_gamma" and step <= self.update_after_step:
            self._copy_fn()
            return
        self._lerp_fn(Tensor(self.current_decay(self.step), ms.float32))

    def copy_from_online(self) -> None:
        self._copy_fn()

    def state(self) -> Dict[str, int]:
        return {"step": self.step}

    def load_state(self, state: Dict[str, int]) -> None:
        self.step = int(state["step"])
