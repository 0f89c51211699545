"""Debug measurements of one round, from the coordinator's raw material.

Every statistic is O(n d) over the (n, d) matrix U of accepted updates (rows
u_k), computed in U's own precision (float32 for the engine's updates) with one
pass over U for the mean and one over blocks of rows for the distances, with no
Python loop over clients or parameters and without forming the (n, n) Gram
matrix:

- update norms ||u_k|| (= the weight divergence of the local model from the
  model it started from, ||w_k - w_old||, since updates are deltas);
- spread around the weighted mean m = sum_k p_k u_k (p: the aggregation
  weights): ``update_variance`` = sum_k p_k ||u_k - m||^2 / d, the trace of the
  weighted covariance divided by d (the mean per-coordinate variance); the
  un-normalised trace is ``update_sq_dist_to_mean``;
- cosine of each update to the aggregate a: <u_k, a> / (||u_k|| ||a||);
- distance of each local model to the *new* global model,
  ||w_k - w_new|| = ||u_k - s|| with s = w_new - w_old the server step
  (``weight_divergence``, the quantity of Zhao et al., "Federated Learning with
  Non-IID Data", 2018, measured per client);
- mean pairwise distance between updates over i < j: exact over every pair when
  there are at most `_PAIRWISE_PAIRS` of them (n <= 23), otherwise estimated on
  `_PAIRWISE_PAIRS` pairs drawn uniformly (with replacement, fixed seed); the
  record says which (``pairwise_pairs``: pairs used, ``pairwise_exact``) — the
  only quantity that would otherwise cost O(n^2 d);
- global model norm ||w_new|| and step size ||w_new - w_old||.

Distances come from one pass over U by blocks of rows: each row's norm and its dot
products with a, m and s, so ||u_k - c||^2 = ||u_k||^2 - 2 <u_k, c> + ||c||^2.  That
identity subtracts nearly equal numbers when u_k is close to c, so such rows (a squared
distance under a tenth of ||u_k||^2 + ||c||^2) are measured directly, on the difference
written into one reused block buffer; and so is the whole matrix when those rows carry
more than a quarter of the weight, where the spread is also made exact for the rounding
of the mean: with r_k = u_k - m' (m' the mean as computed) and e = sum_k p_k r_k (small,
so accurate), sum_k p_k ||u_k - m||^2 = sum_k p_k ||r_k||^2 - ||e||^2.  Elsewhere the
identity's rounding is a few 1e-6 of each result at most in float32.  At 1,000 clients of
the digits MLP the measurements take 10 ms a round, against 15 ms on the differences
(`benchmarks/round_parts.py`, mode `direct-measure`: 21 ms, the differences after the
pass they replace).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..records import RoundRecord

DEBUG_KEY = "debug"  # record.extra[DEBUG_KEY]: the measurements of this module


def _f(x: Any) -> float:
    return float(x)


def update_statistics(
    updates: torch.Tensor | np.ndarray,
    weights: torch.Tensor | np.ndarray | None = None,
    aggregate: torch.Tensor | np.ndarray | None = None,
    step: torch.Tensor | np.ndarray | None = None,
) -> dict[str, Any]:
    """Measurements of an (n, d) matrix of updates, in its own precision (float32 or
    float64; half precision is widened to float32).

    `weights` (n,) are normalised here (default: uniform); `aggregate` (d,) is
    what the aggregator returned (default: the weighted mean); `step` (d,) is
    w_new - w_old (default: the aggregate).  Returns scalars plus per-client
    lists ``norms``, ``cosines`` and ``divergences`` in row order.
    """
    u = torch.as_tensor(updates).detach()
    if u.ndim != 2 or u.shape[0] == 0:
        raise ValueError(f"updates must be a non-empty (n, d) matrix, got shape {tuple(u.shape)}")
    if not u.is_floating_point() or u.dtype in (torch.float16, torch.bfloat16):
        u = u.to(torch.float32)
    n, d = u.shape
    dt = u.dtype
    p64 = torch.full((n,), 1.0 / n, dtype=torch.float64) if weights is None else torch.as_tensor(weights).detach().to(torch.float64)
    p64 = p64 / p64.sum()
    p = p64.to(dt)
    mean = p @ u  # one pass (its rounding is corrected below)
    a = mean if aggregate is None else torch.as_tensor(aggregate).detach().to(device=u.device, dtype=dt)
    s = a if step is None else torch.as_tensor(step).detach().to(device=u.device, dtype=dt)
    step_off = s - mean
    rows = block_rows(d, u.element_size())
    buf = torch.empty(min(n, rows), d, dtype=dt, device=u.device)
    norms, ua, sq_r, diverg, trace = _spread(u, p, p64, a, mean, s, step_off, buf)
    a_norm = torch.linalg.vector_norm(a)
    denom = norms * a_norm
    cos = torch.where(denom > 0, ua / torch.where(denom > 0, denom, 1.0), torch.full_like(ua, math.nan))
    pairwise, pairs, exact = _pairwise_mean(u, buf)
    q = torch.quantile(norms.double(), torch.tensor([0.5, 0.9], dtype=torch.float64))
    cos_finite = cos[torch.isfinite(cos)].double()
    return {
        "n": int(n),
        "dim": int(d),
        "update_norm_min": _f(norms.min()),
        "update_norm_p50": _f(q[0]),
        "update_norm_p90": _f(q[1]),
        "update_norm_max": _f(norms.max()),
        "update_sq_dist_to_mean": trace,
        "update_variance": trace / d,
        "cosine_mean": _f(cos_finite.mean()) if cos_finite.numel() else math.nan,
        "cosine_std": _f(cos_finite.std(unbiased=False)) if cos_finite.numel() else math.nan,
        "cosine_min": _f(cos_finite.min()) if cos_finite.numel() else math.nan,
        "weight_divergence_mean": _f(p64 @ diverg.double()),
        "weight_divergence_max": _f(diverg.max()),
        "pairwise_distance_mean": pairwise,
        "pairwise_pairs": pairs,
        "pairwise_exact": exact,
        "aggregate_norm": _f(a_norm),
        "norms": norms.tolist(),
        "cosines": cos.tolist(),
        "divergences": diverg.tolist(),
    }


_CANCEL = 0.1  # a squared distance below this fraction of ||u||^2 + ||c||^2 is taken directly
_DOT_BYTES = 2 << 20  # rows per block of the dot products' pass: about this many bytes


def _spread(u, p, p64, a, mean, s, step_off, buf):
    """(norms, <u_k, a>, ||u_k - mean||^2, ||u_k - s||, the weighted spread) of the rows of `u`.

    One pass over `u` by blocks of rows (`_norms_and_dots`): each block's norms and its dot
    products with the aggregate, the mean and the step, so a squared distance is
    ``||u||^2 - 2 <u, c> + ||c||^2``.  That subtraction loses the digits the terms share, so
    a row whose squared distance is below `_CANCEL` of ``||u||^2 + ||c||^2`` (with ||c||
    near ||u||: a row within about half its norm of c), or negative, is measured directly
    (`_direct_spread`), as is the whole matrix when such rows carry more than a quarter of
    the weight (a cohort close to its mean: the spread is then also corrected for the
    mean's rounding).  Elsewhere the identity's rounding is a few 1e-6 of the result at
    most in float32."""
    dt = u.dtype
    norms, dots = _norms_and_dots(u, [a, mean, s])
    ua, um, us = dots
    n2 = norms.double().square()
    m2 = float(mean.double().square().sum())
    s2 = float(s.double().square().sum())
    sq_r = n2 - 2.0 * um.double() + m2
    dv2 = n2 - 2.0 * us.double() + s2
    near = (sq_r < _CANCEL * (n2 + m2)) | (dv2 < _CANCEL * (n2 + s2))
    if bool(near.any()):
        if float(p64[near].sum()) > 0.25:
            return _direct_spread(u, p, p64, a, mean, step_off, buf)
        idx = torch.nonzero(near).flatten()
        _, _, sq_near, dv_near, _ = _direct_spread(u.index_select(0, idx), p[idx], p64[idx], a, mean, step_off, buf)
        sq_r[idx] = sq_near.double()
        dv2[idx] = dv_near.double().square()
    trace = max(0.0, _f(p64 @ sq_r))
    return norms, ua, sq_r.clamp_min(0.0).to(dt), dv2.clamp_min(0.0).sqrt().to(dt), trace


def _norms_and_dots(u: torch.Tensor, vecs: list) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Row norms of `u` and its dot products with each of `vecs`, in one pass over `u` by
    blocks of rows (each block read from memory once, then from cache); a vector given twice
    (the same tensor) is multiplied once."""
    n, d = u.shape
    rows = max(1, min(256, _DOT_BYTES // max(1, d * u.element_size())))
    norms = torch.empty(n, dtype=u.dtype, device=u.device)
    distinct: list[torch.Tensor] = []
    which: list[int] = []
    for v in vecs:
        j = next((i for i, w in enumerate(distinct) if w is v), None)
        if j is None:
            distinct.append(v)
            j = len(distinct) - 1
        which.append(j)
    dots = torch.empty(len(distinct), n, dtype=u.dtype, device=u.device)
    for lo in range(0, n, rows):
        blk = u[lo : lo + rows]
        torch.linalg.vector_norm(blk, dim=1, out=norms[lo : lo + rows])
        for j, v in enumerate(distinct):
            torch.mv(blk, v, out=dots[j, lo : lo + rows])
    return norms, [dots[j] for j in which]


def _direct_spread(u, p, p64, a, mean, step_off, buf):
    """`_spread`'s quantities from the differences themselves: u_k - mean written into one
    reused block buffer (no (n, d) temporaries), its norm, then u_k - s = (u_k - mean) -
    (s - mean) from the block still in cache.  The spread is exact for the rounding of the
    mean: with r_k = u_k - mean (the mean as computed) and e = sum_k p_k r_k (small, so
    accurate), sum_k p_k ||u_k - m||^2 = sum_k p_k ||r_k||^2 - ||e||^2."""
    n, d = u.shape
    dt = u.dtype
    norms = torch.empty(n, dtype=dt, device=u.device)
    ua = torch.empty(n, dtype=dt, device=u.device)
    sq_r = torch.empty(n, dtype=dt, device=u.device)
    diverg = torch.empty(n, dtype=dt, device=u.device)
    err = torch.zeros(d, dtype=dt, device=u.device)  # sum_k p_k (u_k - mean): the mean's rounding
    rows = buf.shape[0]
    for lo in range(0, n, rows):
        blk = u[lo : lo + rows]
        b = buf[: blk.shape[0]]
        torch.linalg.vector_norm(blk, dim=1, out=norms[lo : lo + rows])
        torch.mv(blk, a, out=ua[lo : lo + rows])
        torch.sub(blk, mean, out=b)
        sq_r[lo : lo + rows] = torch.linalg.vector_norm(b, dim=1).square()
        err.addmv_(b.T, p[lo : lo + rows])
        b.sub_(step_off)
        diverg[lo : lo + rows] = torch.linalg.vector_norm(b, dim=1)
    trace = max(0.0, _f(p64 @ sq_r.double()) - _f(err.double().square().sum()))
    return norms, ua, sq_r, diverg, trace


_BLOCK_BYTES = 512 << 10  # the reused block buffer of update_statistics: small enough to stay in a core's L2 cache


def block_rows(d: int, itemsize: int = 4) -> int:
    """Rows per block in update_statistics: the reused (rows, d) buffer holds about
    `_BLOCK_BYTES`, so the second pass over a block (u - s after u - mean) reads it from
    cache (16 rows of a 10k-parameter model, ~4x fewer than a fixed 64, ~30% faster there)."""
    return max(1, min(64, _BLOCK_BYTES // max(1, d * itemsize)))
_PAIRWISE_PAIRS = 256  # pairs for the mean pairwise distance: every pair up to this many, else a sample


def _pairwise_mean(u: torch.Tensor, buf: torch.Tensor) -> tuple[float, int, bool]:
    """The mean distance over pairs i < j of rows of `u`: (mean, pairs used, exact)."""
    n = u.shape[0]
    if n < 2:
        return math.nan, 0, True
    total = n * (n - 1) // 2
    if total <= _PAIRWISE_PAIRS:
        i, j = torch.triu_indices(n, n, offset=1)
        exact = True
    else:  # uniform pairs of distinct rows, with replacement, seeded: the estimate is reproducible
        g = torch.Generator().manual_seed(0)
        i = torch.randint(0, n, (_PAIRWISE_PAIRS,), generator=g)
        j = torch.randint(0, n - 1, (_PAIRWISE_PAIRS,), generator=g)
        j = j + (j >= i).to(j.dtype)
        exact = False
    i, j = i.to(u.device), j.to(u.device)
    rows = buf.shape[0]
    other = torch.empty_like(buf)
    dist = torch.empty(len(i), dtype=u.dtype, device=u.device)
    for lo in range(0, len(i), rows):
        k = min(rows, len(i) - lo)
        torch.index_select(u, 0, i[lo : lo + k], out=buf[:k])
        torch.index_select(u, 0, j[lo : lo + k], out=other[:k])
        dist[lo : lo + k] = torch.linalg.vector_norm(buf[:k].sub_(other[:k]), dim=1)
    return _f(dist.double().mean()), int(len(i)), exact


def participation_statistics(record: RoundRecord) -> dict[str, Any]:
    """Counts derived from the record's client list."""
    replied = record.accepted + record.rejected + record.late
    return {
        "replied": int(replied),
        "participation_rate": (record.accepted / record.selected) if record.selected else math.nan,
        "dropout_rate": (record.dropped / record.selected) if record.selected else math.nan,
        "completion_max_s": max((c.arrival_s for c in record.clients if c.status != "dropped" and not math.isnan(c.arrival_s)), default=math.nan),
    }


class DebugMeasurements:
    """RoundHook: adds ``record.extra["debug"]`` with the round's update statistics
    (see the module docstring), the global model norm and step size, and
    participation ratios.  After a round without updates (failed, or nothing
    accepted) only the model norm and the participation figures are recorded.

    Per-client values are stored in row order of the accepted updates under
    ``clients`` = {"id": [...], "norm": [...], "cosine": [...], "divergence": [...]}
    so detectors can name clients.  Place it before `MonitorHook`.

    Under secure aggregation or central DP the per-update statistics are not
    computed (``updates_hidden`` says why): the server is not meant to see
    individual updates (SecAgg), and figures derived from un-noised individual
    updates are not covered by the DP guarantee once exported.
    """

    name = "debug_measurements"
    phase = "measure"  # its wall time is the round's "measure" phase (engine/phases.py)

    def __init__(self, per_client: bool = True):
        self.per_client = per_client

    @staticmethod
    def hidden_reason(coordinator: Any) -> str | None:
        privacy = getattr(coordinator, "privacy", None)
        if privacy is None:
            return None
        if getattr(privacy, "secure", None) is not None:
            return "secure aggregation: individual updates are not visible to the server"
        if getattr(privacy, "central", None) is not None:
            return "central DP: statistics of un-noised individual updates would escape the privacy accounting"
        return None

    def after_round(self, record: RoundRecord, coordinator: Any) -> None:
        out: dict[str, Any] = participation_statistics(record)
        params = getattr(coordinator, "params", None)
        if params is not None:
            out["model_norm"] = _f(torch.linalg.vector_norm(params.detach().to(torch.float64)))
            out["model_finite"] = bool(torch.isfinite(params).all())
        updates = getattr(coordinator, "last_updates", None)
        prev = getattr(coordinator, "prev_params", None)
        if prev is not None and params is not None:
            out["step_norm"] = _f(torch.linalg.vector_norm((params.detach().to(torch.float64) - prev.detach().to(torch.float64))))
        hidden = self.hidden_reason(coordinator)
        if hidden is not None:
            out["updates_hidden"] = hidden
        elif updates is not None and updates.shape[0] > 0:
            step = (params - prev) if (prev is not None and params is not None) else None
            stats = update_statistics(updates, getattr(coordinator, "last_weights", None), getattr(coordinator, "last_aggregate", None), step)
            norms, cosines, divergences = stats.pop("norms"), stats.pop("cosines"), stats.pop("divergences")
            out.update(stats)
            if self.per_client:
                ids = [c.client_id for c in record.clients if c.status == "accepted"]
                if len(ids) == len(norms):  # rows of last_updates are the accepted clients in order
                    out["clients"] = {"id": ids, "norm": norms, "cosine": cosines, "divergence": divergences}
        record.extra[DEBUG_KEY] = out


def debug_of(record: RoundRecord) -> dict[str, Any]:
    """The record's debug measurements ({} if none); None values read back as NaN."""
    d = record.extra.get(DEBUG_KEY) or {}
    return d if isinstance(d, dict) else {}


def num(x: Any) -> float:
    """A float from a stored value: None (NaN stored as JSON null) and junk become NaN."""
    if x is None:
        return math.nan
    if isinstance(x, str):
        if x == "inf":
            return math.inf
        if x == "-inf":
            return -math.inf
        return math.nan
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan
