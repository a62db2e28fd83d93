"""Data parallelism through MindSpore's own launchers (msrun, or a rank table on older Ascend clusters)
and collectives (HCCL on Ascend, NCCL on GPU, MindSpore's CPU collectives "mccl").

How a process finds out what it is:

* under ``msrun`` every process gets ``MS_ROLE``: the *scheduler* (``MS_SCHED``, one per job, on the
  master node) runs the same script, and ``init()`` turns it into the cluster's meta server, which
  exits with the job -- ``init_data_parallel`` never returns in that process; the *workers*
  (``MS_WORKER``) join the cluster and get their rank;
* under a rank table (``RANK_TABLE_FILE`` / ``MINDSPORE_HCCL_CONFIG_PATH`` with ``RANK_ID``,
  ``RANK_SIZE`` > 1 and no ``MS_ROLE``) ``init()`` reads the table (HCCL, Ascend only);
* otherwise it is a single process and everything here is a no-op.

The train step averages gradients with an explicit ``nn.DistributedGradReducer`` (the data-parallel
context alone does not average the gradients of a functional ``value_and_grad`` step). What else keeps
the replicas in lock step lives here too, as host-side helpers the trainers call:

* ``check_replicas``: every rank hashes its whole training state (weights, EMA, optimizer moments,
  loss scale, step, data position) and the hashes are compared across ranks -- at the start of
  training (identical initial weights are verified, not assumed) and after a resume;
* ``gather_rng_states`` / ``rng_for_resume``: each rank draws its own noise and timesteps from its
  own host RNG; a checkpoint (written by rank 0) holds every rank's RNG state, so a resume with the
  same number of workers continues each stream exactly;
* ``resume_position``: where in the epoch to continue when the number of workers or the per-device
  batch size changed since the checkpoint was written.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import mindspore as ms
import numpy as np
from mindspore import nn

__all__ = ["DataParallel", "init_data_parallel", "launched_by_msrun", "launched_by_rank_table", "current",
           "all_gather", "all_gather_json", "check_replicas", "ReplicaMismatchError", "state_digest",
           "gather_rng_states", "rng_for_resume", "fresh_rng", "resume_position", "WORKER_LINE_PREFIX"]

#: Each worker prints one line starting with this (pid, rank, host) into its log; the launch scripts
#: use it to name the worker behind a failed process id.
WORKER_LINE_PREFIX = "[ms_diffusion] data-parallel worker"


def launched_by_msrun() -> bool:
    """True in the processes msrun starts (its scheduler and its workers)."""
    return os.environ.get("MS_ROLE") in ("MS_WORKER", "MS_SCHED")


def launched_by_rank_table() -> bool:
    """True in a per-rank process of a rank-table launch (older Ascend clusters, HCCL)."""
    if os.environ.get("MS_ROLE"):
        return False
    table = os.environ.get("RANK_TABLE_FILE") or os.environ.get("MINDSPORE_HCCL_CONFIG_PATH")
    try:
        size = int(os.environ.get("RANK_SIZE", "1"))
    except ValueError:
        size = 1
    return bool(table) and size > 1


@dataclass
class DataParallel:
    """This process's place in the job: ``rank`` in ``[0, world_size)``."""

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


def current() -> DataParallel:
    """The state set by ``init_data_parallel`` (a single process if it was never called)."""
    return _STATE if _STATE is not None else DataParallel()


def init_data_parallel() -> DataParallel:
    """Initialise collectives once if launched by msrun or a rank table; return this process's rank
    and the world size. Call after ``runtime.setup`` (the device must be set first).

    In msrun's scheduler process this serves the cluster and exits the process when the job ends.
    """
    global _STATE
    if _STATE is not None:
        return _STATE
    if not (launched_by_msrun() or launched_by_rank_table()):
        _STATE = DataParallel()
        return _STATE
    from mindspore.communication import get_group_size, get_rank, init

    if os.environ.get("MS_ROLE") == "MS_SCHED":
        init()        # runs msrun's meta server; MindSpore ends the process when the workers are done
        sys.exit(0)   # in case a MindSpore version returns instead
    print(f"{WORKER_LINE_PREFIX}: pid {os.getpid()} on {socket.gethostname()}, joining the cluster "
          f"(msrun RANK_ID={os.environ.get('RANK_ID', '?')}, {os.environ.get('MS_WORKER_NUM') or os.environ.get('RANK_SIZE')} "
          f"workers)", flush=True)
    init()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
    _STATE = DataParallel(rank=get_rank(), world_size=get_group_size())
    print(f"{WORKER_LINE_PREFIX}: pid {os.getpid()} is rank {_STATE.rank} of {_STATE.world_size}", flush=True)
    return _STATE


# ---------------------------------------------------------------------- host-side collectives

def all_gather(array: np.ndarray) -> np.ndarray:
    """Every rank's ``array`` (same shape and dtype on all ranks), stacked in rank order:
    ``(world_size, *array.shape)``. A blocking collective: every rank must call it, in the same order.
    A single process gets ``array[None]``."""
    array = np.ascontiguousarray(array)
    dp = current()
    if not dp.enabled:
        return array[None].copy()
    from mindspore import Tensor, ops

    flat = array.reshape(1, -1) if array.ndim != 0 else array.reshape(1, 1)
    gathered = ops.AllGather()(Tensor(flat)).asnumpy()
    return gathered.reshape((dp.world_size,) + array.shape)


def all_gather_json(obj: Any) -> List[Any]:
    """Every rank's JSON-serialisable ``obj``, in rank order (a blocking collective)."""
    data = np.frombuffer(json.dumps(obj, sort_keys=True).encode(), dtype=np.uint8).astype(np.int32)
    lengths = all_gather(np.array([data.size], dtype=np.int64))[:, 0]
    padded = np.zeros(int(lengths.max()), dtype=np.int32)
    padded[:data.size] = data
    rows = all_gather(padded)
    return [json.loads(bytes(row[:n].astype(np.uint8)).decode()) for row, n in zip(rows, lengths)]


# ---------------------------------------------------------------------- replica consistency

class ReplicaMismatchError(RuntimeError):
    """The data-parallel ranks do not hold the same training state."""


def state_digest(arrays: Mapping[str, np.ndarray], position: Sequence[int]) -> int:
    """A 63-bit hash of named arrays (names, dtypes, shapes and bytes) and an integer position."""
    h = hashlib.blake2b(digest_size=8)
    h.update(np.asarray(position, dtype=np.int64).tobytes())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


def check_replicas(arrays: Mapping[str, np.ndarray], step: int, epoch: int, batch_in_epoch: int,
                   when: str) -> None:
    """Raise ``ReplicaMismatchError`` on every rank unless all ranks hold bit-identical ``arrays`` and
    the same (step, epoch, batch_in_epoch). A collective; a no-op for a single process."""
    dp = current()
    if not dp.enabled:
        return
    mine = np.array([step, epoch, batch_in_epoch, state_digest(arrays, (step, epoch, batch_in_epoch))],
                    dtype=np.int64)
    rows = all_gather(mine)
    if (rows == rows[0]).all():
        return
    states = "; ".join(f"rank {r}: step {int(s)}, epoch {int(e)}, batch {int(b)}, state hash {int(d):016x}"
                       for r, (s, e, b, d) in enumerate(rows))
    if len({int(s) for s in rows[:, 0]}) > 1:
        hint = ("the ranks resumed from different checkpoints: every rank reads the run folder, so put it on a "
                "file system all nodes share (or copy the checkpoint to the same path on every node)")
    else:
        hint = ("the ranks built different weights: build the model from the same config and seed on every rank "
                "(ms_diffusion.runtime.setup seeds MindSpore's initialisers) and do not draw random numbers "
                "rank-dependently before the model is built")
    raise ReplicaMismatchError(f"data-parallel replicas differ {when} ({states}); {hint}")


# ---------------------------------------------------------------------- per-rank host RNG

def fresh_rng(seed: int, rank: int, step: int = 0) -> np.random.Generator:
    """A rank's host RNG for noise and timesteps: ``[seed, 1, rank]`` at the start of a run,
    ``[seed, 1, rank, step]`` when a resume cannot restore the saved stream."""
    key = [int(seed), 1, int(rank)] + ([int(step)] if step else [])
    return np.random.default_rng(key)


def gather_rng_states(rng: np.random.Generator) -> Optional[List[Dict[str, Any]]]:
    """Every rank's ``rng.bit_generator.state`` in rank order (a collective), or None for one process."""
    if not current().enabled:
        return None
    return all_gather_json(rng.bit_generator.state)


def rng_for_resume(meta: Mapping[str, Any], *, seed: int, rank: int, world_size: int,
                   step: int) -> Tuple[np.random.Generator, bool]:
    """This rank's host RNG after loading a checkpoint's ``meta``; True if the saved stream was restored.

    The saved stream is restored when the checkpoint was written with the same seed and number of
    workers (rank r gets ``meta["rng_ranks"][r]``; a single-process checkpoint keeps ``meta["rng"]``).
    Otherwise -- e.g. a single-device checkpoint resumed by 2 workers -- per-rank streams cannot be
    recovered, and each rank starts the fresh stream ``fresh_rng(seed, rank, step)``: the run continues
    from the same weights, optimizer, EMA and data position with different (but still independent and
    reproducible) noise from that step on.
    """
    saved_world = int(meta.get("world_size", 1))
    same_seed = int(meta.get("seed", seed)) == int(seed)
    state = None
    if same_seed and saved_world == world_size:
        per_rank = meta.get("rng_ranks")
        if per_rank is not None and len(per_rank) == world_size:
            state = per_rank[rank]
        elif world_size == 1:
            state = meta.get("rng")
    if state is None:
        return fresh_rng(seed, rank, step), False
    rng = np.random.default_rng()
    rng.bit_generator.state = state
    return rng, True


# ---------------------------------------------------------------------- data position

def resume_position(epoch: int, batch_in_epoch: int, *, saved_batch_size: int, saved_world_size: int,
                    batch_size: int, world_size: int, batches_per_epoch: int) -> Tuple[int, int]:
    """The (epoch, batch) to continue from when a checkpoint taken after ``batch_in_epoch`` per-rank batches
    of ``saved_batch_size`` on ``saved_world_size`` ranks is resumed with another batch size or worker count.

    Shards interleave one permutation (rank r takes positions r, r + W, ...), so the first k batches of
    every rank together are exactly the first ``k * B * W`` samples of the epoch's order, whatever W is.
    The position is therefore converted through the samples consumed and rounded up to whole new
    global batches (no sample is seen twice in that epoch); unchanged settings give the same position.
    """
    if saved_batch_size == batch_size and saved_world_size == world_size:
        return epoch, batch_in_epoch
    consumed = batch_in_epoch * saved_batch_size * saved_world_size
    batch = math.ceil(consumed / (batch_size * world_size))
    if batch >= batches_per_epoch:
        return epoch + 1, 0
    return epoch, batch
