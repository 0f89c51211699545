"""Debug measurements of one round, from the coordinator's raw material.

Everything is computed from one (n, n) Gram matrix G = U U^T of the accepted
updates (rows of U) plus two matrix-vector products, so the cost is O(n^2 d)
with no Python loop over clients or parameters:

- update norms ||u_k|| = sqrt(G_kk)  (= the weight divergence of the local model
  from the model it started from, ||w_k - w_old||, since updates are deltas);
- spread around the weighted mean m = sum_k p_k u_k (p: the aggregation weights):
  ||u_k - m||^2 = G_kk - 2 (G p)_k + p^T G p, and
  ``update_variance`` = sum_k p_k ||u_k - m||^2 / d, the trace of the weighted
  covariance divided by d (the mean per-coordinate variance); the un-normalised
  trace is ``update_sq_dist_to_mean``;
- cosine of each update to the aggregate a: (U a)_k / (||u_k|| ||a||);
- distance of each local model to the *new* global model,
  ||w_k - w_new|| = ||u_k - s|| with s = w_new - w_old the server step:
  sqrt(G_kk - 2 (U s)_k + ||s||^2)  (``weight_divergence``, the quantity of
  Zhao et al., "Federated Learning with Non-IID Data", 2018, measured per client);
- mean pairwise distance between updates, sqrt(G_ii + G_jj - 2 G_ij) over i < j;
- global model norm ||w_new|| and step size ||w_new - w_old||.

Sums are taken in float64: the Gram identities subtract nearly equal numbers.
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
    """Measurements of an (n, d) matrix of updates.

    `weights` (n,) are normalised here (default: uniform); `aggregate` (d,) is
    what the aggregator returned (default: the weighted mean); `step` (d,) is
    w_new - w_old (default: the aggregate).  Returns scalars plus per-client
    lists ``norms``, ``cosines`` and ``divergences`` in row order.
    """
    u = torch.as_tensor(updates).detach().to(torch.float64)
    if u.ndim != 2 or u.shape[0] == 0:
        raise ValueError(f"updates must be a non-empty (n, d) matrix, got shape {tuple(u.shape)}")
    n, d = u.shape
    p = torch.full((n,), 1.0 / n, dtype=torch.float64) if weights is None else torch.as_tensor(weights).detach().to(torch.float64)
    p = p / p.sum()
    gram = u @ u.T  # (n, n)
    sq = torch.diagonal(gram).clamp_min(0.0)
    norms = sq.sqrt()
    gp = gram @ p
    pgp = p @ gp
    sq_to_mean = (sq - 2.0 * gp + pgp).clamp_min(0.0)  # ||u_k - m||^2
    a = (p @ u) if aggregate is None else torch.as_tensor(aggregate).detach().to(torch.float64)
    a_norm = torch.linalg.vector_norm(a)
    ua = u @ a
    denom = norms * a_norm
    cos = torch.where(denom > 0, ua / torch.where(denom > 0, denom, 1.0), torch.full_like(ua, math.nan))
    s = a if step is None else torch.as_tensor(step).detach().to(torch.float64)
    s_sq = s @ s
    diverg = (sq - 2.0 * (u @ s) + s_sq).clamp_min(0.0).sqrt()
    if n > 1:
        iu = torch.triu_indices(n, n, offset=1)
        pair_sq = (sq[:, None] + sq[None, :] - 2.0 * gram)[iu[0], iu[1]].clamp_min(0.0)
        pairwise = _f(pair_sq.sqrt().mean())
    else:
        pairwise = math.nan
    q = torch.quantile(norms, torch.tensor([0.5, 0.9], dtype=torch.float64))
    cos_finite = cos[torch.isfinite(cos)]
    trace = _f(p @ sq_to_mean)
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
        "weight_divergence_mean": _f(p @ diverg),
        "weight_divergence_max": _f(diverg.max()),
        "pairwise_distance_mean": pairwise,
        "aggregate_norm": _f(a_norm),
        "norms": norms.tolist(),
        "cosines": cos.tolist(),
        "divergences": diverg.tolist(),
    }


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
