"""Data parallelism through MindSpore's own launcher (msrun) and collectives (HCCL / NCCL / CPU).

Under ``msrun`` (which sets ``MS_ROLE=MS_WORKER`` and ``MS_WORKER_NUM``) ``init_data_parallel``
initialises the communication group and the data-parallel context; the train step then averages
gradients with an explicit ``nn.DistributedGradReducer`` (the context alone does not average the
gradients of a functional ``value_and_grad`` step). Outside msrun it is a no-op single process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import mindspore as ms
from mindspore import nn

__all__ = ["DataParallel", "init_data_parallel", "launched_by_msrun"]


def launched_by_msrun() -> bool:
    return os.environ.get("MS_ROLE") == "MS_WORKER" and int(os.environ.get("MS_WORKER_NUM", "1")) > 1


@dataclass
class DataParallel:
    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def grad_reducer(self, params: Sequence[ms.Parameter]) -> Optional[nn.Cell]:
        """Mean all-reduce of gradients across ranks, or None for a single process."""
        if not self.enabled:
            return None
        return nn.DistributedGradReducer(params, mean=True, degree=self.world_size)


_STATE: Optional[DataParallel] = None


def init_data_parallel() -> DataParallel:
    """Initialise collectives once if launched by msrun; return this process's rank and the world size."""
    global _STATE
    if _STATE is not None:
        return _STATE
    if not launched_by_msrun():
        _STATE = DataParallel()
        return _STATE
    from mindspore.communication import get_group_size, get_rank, init

    init()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
    _STATE = DataParallel(rank=get_rank(), world_size=get_group_size())
    return _STATE
