"""Minimum-cost assignment (Hungarian / shortest augmenting path), numpy only.

Used for immiscible diffusion's noise assignment; a runtime dependency on scipy for one call
is not worth it. Vectorised over columns: O(n^2) Python steps of O(n) numpy work, a few ms for
the batch sizes diffusion training uses.
"""
from __future__ import annotations

import numpy as np

__all__ = ["linear_sum_assignment", "pairwise_distances"]


def linear_sum_assignment(cost: np.ndarray) -> np.ndarray:
    """For a square cost matrix (n, n) return ``col`` with sum(cost[i, col[i]]) minimal."""
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"linear_sum_assignment expects a square matrix, got shape {cost.shape}")
    if not np.all(np.isfinite(cost)):
        raise ValueError("linear_sum_assignment: the cost matrix has non-finite entries")
    n = cost.shape[0]
    u = np.zeros(n + 1)
    v = np.zeros(n + 1)
    p = np.zeros(n + 1, dtype=np.int64)      # p[j]: row matched to column j (1-based, 0 = free)
    way = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):
        p[0] = i
        j0 = 0
        minv = np.full(n + 1, np.inf)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = p[j0]
            cur = cost[i0 - 1] - u[i0] - v[1:]
            free = ~used[1:]
            better = free & (cur < minv[1:])
            minv[1:][better] = cur[better]
            way[1:][better] = j0
            masked = np.where(free, minv[1:], np.inf)
            j1 = int(np.argmin(masked)) + 1
            delta = masked[j1 - 1]
            u[p[used]] += delta
            v[used] -= delta
            minv[~used] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    col = np.empty(n, dtype=np.int64)
    col[p[1:] - 1] = np.arange(n)
    return col


def pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances between the rows of a (n, d) and b (m, d) (torch.cdist)."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(sq, 0.0))
