"""The compiled training step: value_and_grad, dynamic loss scaling, clipping, accumulation, all-reduce.

One optimizer update = ``grad_accum`` micro-batches. With ``grad_accum == 1`` forward, backward and
update are one graph; otherwise micro-batch gradients are summed into buffers by one graph and a
second graph applies them. On a non-finite gradient the update is skipped and the loss scale
shrinks (``mindspore.amp.DynamicLossScaler``); the optimizer's step count does not advance.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.amp import DynamicLossScaler, StaticLossScaler

from ms_diffusion.runtime import maybe_jit

__all__ = ["TrainStep", "global_norm"]

_add = ops.MultitypeFuncGraph("accum_add")
_zero = ops.MultitypeFuncGraph("accum_zero")
_sqsum = ops.MultitypeFuncGraph("square_sum")
_hyper_map = ops.HyperMap()


@_add.register("Tensor", "Tensor")
def _add_one(buf, grad):
    return ops.assign_add(buf, grad)


@_zero.register("Tensor")
def _zero_one(buf):
    return ops.assign(buf, ops.zeros_like(buf))


@_sqsum.register("Tensor")
def _sqsum_one(g):
    return ops.reduce_sum(ops.square(g.astype(ms.float32)))


def global_norm(grads) -> ms.Tensor:
    """sqrt(sum of squares of every gradient), float32."""
    return ops.sqrt(ops.addn(_hyper_map(_sqsum, grads)))


class TrainStep:
    """``step(*inputs) -> (loss, grad_norm, finite)`` for ``loss_fn(*inputs) -> scalar loss``.

    ``inputs`` are Tensors (or None / Python constants, which specialise the compiled graph).
    ``loss_scaler`` None means no scaling (fp32); ``grad_reducer`` (e.g. nn.DistributedGradReducer)
    averages gradients across data-parallel ranks before the finiteness check. With ``has_aux``
    ``loss_fn`` returns ``(loss, *aux)`` (only ``loss`` is differentiated) and the step returns
    ``(loss, grad_norm, finite, aux)``, aux the tuple of the remaining outputs of this micro-batch.
    """

    def __init__(self, loss_fn: Callable, optimizer: nn.Optimizer, *, grad_accum: int = 1,
                 clip_grad_norm: Optional[float] = None, loss_scaler=None, grad_reducer: Optional[nn.Cell] = None,
                 has_aux: bool = False):
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
        self.optimizer = optimizer
        self.params = optimizer.parameters
        self.grad_accum = int(grad_accum)
        self.clip = float(clip_grad_norm) if clip_grad_norm else 0.0
        self.scaler = loss_scaler if loss_scaler is not None else StaticLossScaler(1.0)
        self.reducer = grad_reducer
        self.micro_step = 0
        self.has_aux = bool(has_aux)
        inv_k = 1.0 / self.grad_accum
        scaler = self.scaler

        def scaled_loss(*inputs):
            out = loss_fn(*inputs)
            if has_aux:
                return scaler.scale(out[0] * inv_k), out[0], out[1:]
            return scaler.scale(out * inv_k), out

        self._grad_fn = ms.value_and_grad(scaled_loss, None, self.params, has_aux=True)
        self._hyper = ops.HyperMap()
        if self.grad_accum > 1:
            self._accum = ms.ParameterTuple([Parameter(ops.zeros_like(p), name=f"grad_accum.{p.name}",
                                                       requires_grad=False) for p in self.params])
            self._accumulate = maybe_jit(self._accumulate_impl)
            self._apply = maybe_jit(self._apply_accumulated)
        self._fused = maybe_jit(self._fused_impl)

    # -- graph bodies
    def _update(self, grads):
        if self.reducer is not None:
            grads = self.reducer(grads)
        grads = self.scaler.unscale(grads)
        norm = global_norm(grads)
        # A NaN or Inf anywhere makes the norm non-finite: one check instead of one per gradient, which
        # on CPU cost 70 ms of a 770 ms step. (A norm beyond float32's range, 1.8e19, also counts.)
        finite = ops.isfinite(norm)
        if self.clip > 0:
            factor = ops.minimum(self.clip / (norm + 1e-6), 1.0)
            grads = self._hyper(ops.partial(ops.mul, factor), grads)
        if finite:
            self.optimizer(grads)
        self.scaler.adjust(finite)
        return norm, finite

    def _fused_impl(self, *inputs):
        values, grads = self._grad_fn(*inputs)
        norm, finite = self._update(grads)
        if self.has_aux:
            return values[1], norm, finite, values[2]
        return values[1], norm, finite

    def _accumulate_impl(self, *inputs):
        values, grads = self._grad_fn(*inputs)
        self._hyper(_add, self._accum, grads)
        if self.has_aux:
            return values[1], values[2]
        return values[1]

    def _apply_accumulated(self):
        norm, finite = self._update(tuple(self._accum))
        self._hyper(_zero, self._accum)
        return norm, finite

    # -- host API
    def __call__(self, *inputs) -> tuple:
        """Run one micro-batch. Returns (loss, grad_norm, finite) (+ (aux,) with ``has_aux``); grad_norm
        and finite are None until the ``grad_accum``-th micro-batch applies the update."""
        if self.grad_accum == 1:
            return self._fused(*inputs)
        out = self._accumulate(*inputs)
        loss, aux = (out[0], out[1]) if self.has_aux else (out, None)
        self.micro_step += 1
        if self.micro_step % self.grad_accum:
            norm, finite = None, None
        else:
            norm, finite = self._apply()
        return (loss, norm, finite, aux) if self.has_aux else (loss, norm, finite)

    @property
    def loss_scale(self) -> float:
        value = getattr(self.scaler, "scale_value", None)
        return float(value.asnumpy()) if value is not None else 1.0

    def scaler_parameters(self) -> Sequence[Parameter]:
        return [p for p in (getattr(self.scaler, "scale_value", None), getattr(self.scaler, "counter", None))
                if isinstance(p, Parameter)]


def make_loss_scaler(kind: str, init_scale: float = 2.0 ** 16, factor: float = 2.0, window: int = 1000):
    """``"dynamic"`` (MindSpore's DynamicLossScaler), ``"static"`` (fixed scale) or ``"none"``."""
    if kind == "dynamic":
        if float(factor) != int(factor) or int(factor) < 2:
            raise ValueError(f"loss_scale_factor must be an integer >= 2 for dynamic loss scaling, got {factor}")
        return DynamicLossScaler(float(init_scale), int(factor), int(window))
    if kind == "static":
        return StaticLossScaler(init_scale)
    if kind == "none":
        return None
    raise ValueError(f"unknown loss_scale {kind!r}; choose dynamic, static or none")
