"""Optimizers and learning-rate schedules.

Schedules are ``LearningRateSchedule`` cells evaluated inside the compiled step from the
optimizer's own ``global_step`` (the number of updates applied so far), so a resumed run picks up
the exact learning rate from the restored optimizer state.
"""
from __future__ import annotations

import math
from typing import Sequence

import mindspore as ms
from mindspore import Tensor, nn, ops
from mindspore.nn.learning_rate_schedule import LearningRateSchedule

__all__ = ["WarmupCosineLR", "WarmupConstantLR", "build_lr_schedule", "build_optimizer", "LR_SCHEDULES",
           "OPTIMIZERS"]

LR_SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("adam", "adamw")


class WarmupConstantLR(LearningRateSchedule):
    """lr = max_lr * min(1, (step + 1) / warmup_steps)."""

    def __init__(self, max_lr: float, warmup_steps: int = 0):
        super().__init__()
        self.max_lr = float(max_lr)
        self.warmup = max(int(warmup_steps), 0)

    def construct(self, global_step):
        if self.warmup == 0:
            return ops.fill(ms.float32, (), self.max_lr)
        s = global_step.astype(ms.float32)
        return self.max_lr * ops.minimum((s + 1.0) / self.warmup, 1.0)


class WarmupCosineLR(LearningRateSchedule):
    """Linear warm-up to ``max_lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``total_steps``.

    With warmup_steps=0, max_lr=1e-4, min_lr=1e-7 this is the MindSpore tutorial's
    ``nn.cosine_decay_lr`` evaluated per step instead of per epoch.
    """

    def __init__(self, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int):
        super().__init__()
        if total_steps <= warmup_steps:
            raise ValueError(f"cosine schedule: total steps ({total_steps}) must exceed warm-up steps ({warmup_steps})")
        self.max_lr, self.min_lr = float(max_lr), float(min_lr)
        self.warmup = max(int(warmup_steps), 0)
        self.decay_steps = float(total_steps - self.warmup)

    def construct(self, global_step):
        return self.lr_at(global_step, self.decay_steps)

    def lr_at(self, global_step, decay_steps):
        """The learning rate at ``global_step`` with the cosine decay spread over ``decay_steps`` (a float, or a
        scalar Parameter that can be changed between steps)."""
        s = global_step.astype(ms.float32)
        progress = ops.clamp((s - self.warmup) / decay_steps, 0.0, 1.0)
        cosine = self.min_lr + 0.5 * (self.max_lr - self.min_lr) * (1.0 + ops.cos(math.pi * progress))
        if self.warmup == 0:
            return cosine
        warm = self.max_lr * (s + 1.0) / self.warmup
        return ops.select(s < self.warmup, warm, cosine)


def build_lr_schedule(name: str, lr: float, *, warmup_steps: int = 0, total_steps: int = 1,
                      min_lr: float = 0.0) -> LearningRateSchedule:
    if name == "constant":
        return WarmupConstantLR(lr, warmup_steps)
    if name == "cosine":
        return WarmupCosineLR(lr, min_lr, warmup_steps, total_steps)
    raise ValueError(f"unknown lr_schedule {name!r}; choose one of {LR_SCHEDULES}")


def build_optimizer(params: Sequence[ms.Parameter], name: str, lr_schedule: LearningRateSchedule, *,
                    betas: Sequence[float] = (0.9, 0.99), eps: float = 1e-8, weight_decay: float = 0.0
                    ) -> nn.Optimizer:
    """Adam (L2 weight decay folded into the gradient, as torch.optim.Adam) or AdamW (decoupled)."""
    b1, b2 = float(betas[0]), float(betas[1])
    if name == "adam":
        return nn.Adam(params, learning_rate=lr_schedule, beta1=b1, beta2=b2, eps=eps, weight_decay=weight_decay)
    if name == "adamw":
        return nn.AdamWeightDecay(params, learning_rate=lr_schedule, beta1=b1, beta2=b2, eps=eps,
                                  weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")


def current_lr(optimizer: nn.Optimizer) -> float:
    """The learning rate the next update will use (evaluated eagerly; for logging)."""
    lr = optimizer.learning_rate
    if isinstance(lr, LearningRateSchedule):
        return float(lr(optimizer.global_step).asnumpy().reshape(-1)[0])
    return float(Tensor(lr).asnumpy().reshape(-1)[0])
