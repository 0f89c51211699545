"""Weighted mean of client updates, the FedAvg aggregate (McMahan et al., AISTATS 2017, Alg. 1).

Works on an ``(n, d)`` matrix (numpy or torch) and returns ``(d,)``; also available
as a streaming fold, so updates can be added as they arrive without holding the
whole matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch


def _as_tensor(updates) -> torch.Tensor:
    t = torch.as_tensor(updates)
    if t.ndim != 2:
        raise ValueError(f"updates must be an (n, d) matrix, got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError("cannot aggregate an empty cohort (n = 0)")
    return t.to(torch.float32) if not t.is_floating_point() else t


def mean(updates, weights=None):
    """Weighted mean of the rows of `updates`; weights default to uniform and are normalised."""
    was_numpy = isinstance(updates, np.ndarray)
    u = _as_tensor(updates)
    if weights is None:
        out = u.mean(0)
    else:
        w = torch.as_tensor(weights, dtype=u.dtype, device=u.device)
        if w.shape != (u.shape[0],):
            raise ValueError(f"weights must have shape ({u.shape[0]},), got {tuple(w.shape)}")
        if not torch.isfinite(w).all() or (w < 0).any():
            raise ValueError("weights must be finite and non-negative")
        total = w.sum()
        if total <= 0:
            raise ValueError("weights sum to zero")
        out = (w / total) @ u
    return out.numpy() if was_numpy else out


def check_weights(weights, n: int) -> torch.Tensor:
    """`weights` as (n,) float64, refused unless finite, non-negative and not all zero (`coverage_mean`)."""
    w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
    if w.shape != (n,):
        raise ValueError(f"coverage_mean: weights must have shape ({n},), got {tuple(w.shape)}")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError("coverage_mean: weights must be finite and non-negative")
    if n and float(w.sum()) <= 0:
        raise ValueError("coverage_mean: weights sum to zero")
    return w


def _covers_all(index: torch.Tensor, dim: int) -> bool:
    m = torch.zeros(dim, dtype=torch.bool)
    m[index] = True
    return bool(m.all())


def coverage_mean(updates, coverage, weights, dim: int | None = None) -> torch.Tensor:
    """The per-coordinate weighted mean over the clients that cover each coordinate.

    ``Delta[j] = sum_i w_i m_ij u_ij / sum_i w_i m_ij``, 0 where ``sum_i w_i m_ij = 0``:
    HeteroFL's aggregate of sub-models (Diao et al. 2021, eq. (2)), and the aggregate of
    ``subset`` uplinks, whose clients each send a random part of their update
    (`fleetlearn.aggregation.pipeline.CoverageStage`).  Accepted forms:

    - ``updates`` ``(n, d)`` full-size deltas and ``coverage`` an ``(n, d)`` bool mask;
    - ``updates`` ``(n, d)`` and ``coverage`` a list of n index tensors (entries off the
      index are ignored);
    - ``updates`` a list of n sub-model deltas ``(d_i,)`` and ``coverage`` their n index
      tensors (HeteroFL's `width_slices`), with ``dim`` the global size.  This is the cheap form: one
      ``index_add_`` over the concatenated sub-vectors, memory O(sum_i d_i).

    Sums are accumulated in float64 and returned as float32.  When every client covers every
    coordinate the result is computed exactly as `fleetlearn.aggregation.mean` does, so
    HeteroFL with all widths 1 is FedAvg bit for bit.  (An index tensor of every coordinate
    is not checked for duplicates: it is taken as covering each once.)
    """
    if isinstance(coverage, torch.Tensor) and coverage.dtype == torch.bool:
        u = torch.as_tensor(updates)
        if u.ndim != 2 or coverage.shape != u.shape:
            raise ValueError(f"coverage_mean: updates {tuple(u.shape)} and mask {tuple(coverage.shape)} must both be (n, d)")
        n = u.shape[0]
        if n == 0:
            raise ValueError("coverage_mean: cannot aggregate an empty cohort (n = 0)")
        w = check_weights(weights, n)
        if bool(coverage.all()):
            return mean(u.to(torch.float32), weights)
        m = coverage.to(torch.float64) * w[:, None]
        num = (m * u.to(torch.float64)).sum(0)
        den = m.sum(0)
        return torch.where(den > 0, num / den.clamp(min=torch.finfo(torch.float64).tiny), 0.0).to(torch.float32)

    indices = [torch.as_tensor(i, dtype=torch.int64).reshape(-1) for i in coverage]
    n = len(indices)
    if n == 0:
        raise ValueError("coverage_mean: cannot aggregate an empty cohort (n = 0)")
    if isinstance(updates, torch.Tensor) and updates.ndim == 2:
        if updates.shape[0] != n:
            raise ValueError(f"coverage_mean: {updates.shape[0]} updates but {n} index tensors")
        d = updates.shape[1] if dim is None else int(dim)
        if d != updates.shape[1]:
            raise ValueError(f"coverage_mean: dim = {dim} but the updates have {updates.shape[1]} columns")
        subs = (updates[i].index_select(0, idx) for i, idx in enumerate(indices))  # gathered one at a time
        sizes = None
    else:
        subs = [torch.as_tensor(s).reshape(-1) for s in updates]
        if len(subs) != n:
            raise ValueError(f"coverage_mean: {len(subs)} updates but {n} index tensors")
        if dim is None:
            raise ValueError("coverage_mean: pass dim (the global model's size) with sub-model deltas")
        d = int(dim)
        sizes = [s.numel() for s in subs]
    for i, idx in enumerate(indices):
        if sizes is not None and sizes[i] != idx.numel():
            raise ValueError(f"coverage_mean: update {i} has {sizes[i]} entries, its index {idx.numel()}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= d):
            raise ValueError(f"coverage_mean: index {i} points outside 0..{d - 1}")
    w = check_weights(weights, n)
    if all(idx.numel() == d and _covers_all(idx, d) for idx in indices):  # FedAvg, as computed by `mean`
        if isinstance(updates, torch.Tensor) and updates.ndim == 2:
            return mean(updates.to(torch.float32), weights)
        full = torch.zeros(n, d, dtype=torch.float32)
        for i, (s, idx) in enumerate(zip(subs, indices)):
            full[i, idx] = s.to(torch.float32)
        return mean(full, weights)
    num = torch.zeros(d, dtype=torch.float64)
    den = torch.zeros(d, dtype=torch.float64)
    for s, idx, wi in zip(subs, indices, w.tolist()):  # one client at a time: memory O(d + d_i), not O(sum_i d_i)
        num.index_add_(0, idx, s.to(torch.float64), alpha=wi)
        den.index_add_(0, idx, torch.full((idx.numel(),), wi, dtype=torch.float64))
    return torch.where(den > 0, num / den.clamp(min=torch.finfo(torch.float64).tiny), 0.0).to(torch.float32)


@dataclass
class CoverageFold:
    """`coverage_mean_of_rows`' result: the per-coordinate mean, and what the clients sent."""

    mean: torch.Tensor  # (d,) float32, 0 where no client with a positive weight sent the coordinate
    entries: int  # values sent, summed over the clients (entries / d: clients per coordinate)
    missed: int  # coordinates no client sent


def coverage_mean_of_rows(rows: torch.Tensor, supports: Iterable[tuple[np.ndarray, int] | None],
                          weights: torch.Tensor) -> CoverageFold:
    """`coverage_mean` of decoded sparse payloads: `rows` (n, d) are zero off their supports
    (as `decode_payload` writes them), and `supports` yields each row's support as (sorted
    block numbers, block size), or None for a row that covers everything, consumed one at a
    time (`codec.payload_blocks`).  The numerator is then one matrix product over the rows,
    in float32 like `mean`'s; the weight each coordinate got is summed per block in float64
    and expanded once per block size.  Memory: the (d,) sums and one support."""
    n, d = rows.shape
    weights = weights / weights.max()  # (check_weights: some weight is > 0) no float32 overflow below
    num = weights.to(torch.float32) @ rows.to(torch.float32)  # zero off each support: the covered sum
    per_block: dict[int, torch.Tensor] = {}  # block size -> (m,) weight per block
    sent0: dict[int, torch.Tensor] = {}  # block size -> (m,) sent by a client of weight 0
    whole = 0.0  # weight of the rows that cover everything
    entries, whole0 = 0, False
    for got, wi in zip(supports, weights.tolist()):
        if got is None:
            whole += wi
            entries += d
            whole0 |= wi == 0
            continue
        blocks, b = got
        m = -(-d // b)
        idx = torch.from_numpy(np.ascontiguousarray(blocks, dtype=np.int64))
        if b not in per_block:
            per_block[b] = torch.zeros(m, dtype=torch.float64)
        per_block[b].index_add_(0, idx, torch.full((idx.numel(),), wi, dtype=torch.float64))
        entries += idx.numel() * b - (m * b - d if idx.numel() and int(blocks[-1]) == m - 1 else 0)
        if wi == 0:
            sent0.setdefault(b, torch.zeros(m, dtype=torch.bool))[idx] = True
    den = torch.full((d,), whole, dtype=torch.float64)
    for b, wb in per_block.items():
        den += wb.repeat_interleave(b)[:d] if b > 1 else wb
    covered = den > 0
    sent = covered.clone()
    for b, s0 in sent0.items():
        sent |= s0.repeat_interleave(b)[:d] if b > 1 else s0
    missed = 0 if whole0 else d - int(sent.sum())
    out = torch.where(covered, num.to(torch.float64) / den.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
    return CoverageFold(out.to(torch.float32), entries, missed)


class StreamingMean:
    """Folds weighted vectors in as they arrive; memory O(d), not O(n d)."""

    def __init__(self, dim: int):
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.weight = 0.0
        self.count = 0

    def add(self, vec: torch.Tensor, weight: float) -> None:
        self.sum.add_(vec.to(torch.float64), alpha=float(weight))
        self.weight += float(weight)
        self.count += 1

    def result(self) -> torch.Tensor:
        if self.count == 0 or self.weight <= 0:
            raise ValueError("no weighted update was added")
        return (self.sum / self.weight).to(torch.float32)


class MeanAggregator:
    """The `mean` aggregator part: ``aggregate(matrix (n, d), weights (n,)) -> (d,)``."""

    name = "mean"
    needs_individual_updates = False

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return mean(updates, weights)
