"""Greedy k-center coreset for PatchCore's memory bank, fast enough for two CPU cores.

anomalib's ``KCenterGreedy`` recomputes a full N x ~300 distance per selected point
through generic code paths; on grid at 10% that is hours here.  This is the same
greedy rule (pick the point farthest from the chosen set) on a lower-dimensional
Gaussian random projection, with the running minimum distance updated by one
matrix-vector product per pick (``|z|^2 - 2 z.c + |c|^2``).

The projected features are kept feature-major (``D x N``, each feature's values over all patches contiguous):
the mat-vec then streams whole columns (one scaled add per feature dimension) instead of one short dot product
per patch with a horizontal sum, which the CPU BLAS runs at well under the memory's speed.  The rule, the
precision and the random projection are unchanged; docs/benchmarks.md has the timing and the check that the
picks on grid are the same.
"""

from __future__ import annotations

import logging
import time

import torch

log = logging.getLogger(__name__)
SQUARE_ROWS = 65536  # patches per slice of the squared norms


def greedy_coreset(features: torch.Tensor, n_select: int, proj_dim: int = 128, seed: int = 0) -> torch.Tensor:
    """Indices of ``n_select`` rows of ``features`` (N x D) chosen by greedy k-center."""
    n = features.shape[0]
    if n_select >= n:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(seed)
    feats = features.float()
    if feats.shape[1] > proj_dim:
        projection = torch.randn(feats.shape[1], proj_dim, generator=gen) / proj_dim**0.5
        by_dim = projection.T @ feats.T  # [proj_dim, N], contiguous: the projection written feature-major
    else:
        by_dim = feats.T.contiguous()
    rows = by_dim.T  # [N, D] view of the same memory: torch.mv over it streams the columns
    sq = torch.empty(n)
    for start in range(0, n, SQUARE_ROWS):  # in slices: the squares of all patches at once would be as large as by_dim
        part = by_dim[:, start : start + SQUARE_ROWS]
        torch.sum(part * part, 0, out=sq[start : start + SQUARE_ROWS])
    selected = torch.empty(n_select, dtype=torch.long)
    current = int(torch.randint(n, (1,), generator=gen))
    min_dist = torch.full((n,), float("inf"))
    scratch = torch.empty(n)
    started = last_log = time.monotonic()
    for i in range(n_select):
        selected[i] = current
        centre = by_dim[:, current].contiguous()
        # scratch = |z|^2 - 2 z.c + |c|^2, in place to avoid a fresh N-vector per pick
        torch.mv(rows, centre, out=scratch)
        scratch.mul_(-2).add_(sq).add_(sq[current])
        torch.minimum(min_dist, scratch, out=min_dist)
        current = int(torch.argmax(min_dist))
        now = time.monotonic()
        if now - last_log > 10:
            log.info("coreset %d/%d (%.0f s)", i + 1, n_select, now - started)
            last_log = now
    return selected
