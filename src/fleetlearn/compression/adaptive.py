"""Adaptive compression: each client's codec level from its uplink and the round's time budget.

Contract
--------
The policy is configured with a *ladder* of chains ordered from least to most
lossy (e.g. ``["none", "q8", "q4", "topk:0.1 | q8", "topk:0.01 | q8"]``) and the
model dimension.  For a cohort it takes per-client uplink bandwidth (Mbit/s),
one-way latency (s) and the seconds the upload may take, and returns for each
client the index of the **least lossy level whose upload fits**:

    upload_s[i, j] = latency_s[i] + bytes[j] * 8 / (uplink_mbps[i] * 1e6)
    level[i]       = min { j : upload_s[i, j] <= budget_s[i] }

(the same formula as `DeviceProfile.upload_seconds`).  A client for which no
level fits gets the last (most compressed) level, and ``fits[i]`` is False so
the caller can record it, skip the client or give it a longer deadline.
``bytes[j]`` is `estimate_bytes(ladder[j], dim)`: exact for fixed-size chains, an
upper bound for sparsifiers, so a chosen level never takes longer than computed;
pass measured sizes as ``level_bytes`` to be less conservative.

Pure and vectorised: numpy arrays in, numpy arrays out, no state, no Python
loop over clients.  The engine decides what the budget is (e.g. the round
deadline minus the client's download and compute time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .codec import parse_chain


@dataclass(frozen=True)
class Plan:
    levels: np.ndarray  # int64 (n,): index into the ladder
    fits: np.ndarray  # bool (n,): the chosen level's upload fits the budget
    upload_s: np.ndarray  # float64 (n,): upload seconds at the chosen level


def choose_levels(
    level_bytes: Sequence[int] | np.ndarray,
    uplink_mbps: np.ndarray | float,
    latency_s: np.ndarray | float,
    budget_s: np.ndarray | float,
) -> Plan:
    """The least lossy level whose upload fits each client's budget (see the module docstring)."""
    b = np.asarray(level_bytes, dtype=np.float64)
    if b.ndim != 1 or b.size == 0:
        raise ValueError("level_bytes must be a non-empty 1-D sequence (one size per ladder level)")
    if np.any(b < 0) or not np.all(np.isfinite(b)):
        raise ValueError("level_bytes must be finite and >= 0")
    mbps, lat, bud = np.broadcast_arrays(
        np.atleast_1d(np.asarray(uplink_mbps, dtype=np.float64)),
        np.atleast_1d(np.asarray(latency_s, dtype=np.float64)),
        np.atleast_1d(np.asarray(budget_s, dtype=np.float64)),
    )
    if mbps.ndim != 1:
        raise ValueError("uplink_mbps, latency_s and budget_s must be scalars or 1-D arrays of one length")
    if not (np.all(np.isfinite(mbps)) and np.all(mbps > 0)):
        raise ValueError("uplink_mbps must be finite and > 0")
    if not (np.all(np.isfinite(lat)) and np.all(lat >= 0)):
        raise ValueError("latency_s must be finite and >= 0")
    if np.any(np.isnan(bud)):
        raise ValueError("budget_s must not be NaN")
    secs = lat[:, None] + b[None, :] * 8.0 / (mbps[:, None] * 1e6)  # (n, L)
    ok = secs <= bud[:, None]
    fits = ok.any(axis=1)
    levels = np.where(fits, ok.argmax(axis=1), b.size - 1).astype(np.int64)
    return Plan(levels, fits, secs[np.arange(secs.shape[0]), levels])


class AdaptiveCompression:
    """A ladder of chains for one model dimension; `choose` picks a level per client.

    ``policy = AdaptiveCompression(["none", "q8", "q4", "topk:0.01 | q8"], dim)``;
    ``levels = policy.choose(mbps, latency, budget)``; client i then encodes with
    ``policy.chains[levels[i]]`` (any chain's ``decode`` reads every level's payloads).
    """

    name = "adaptive"

    def __init__(self, ladder: Sequence[str], dim: int, level_bytes: Sequence[int] | None = None, seed: int = 0):
        if not ladder:
            raise ValueError("an adaptive ladder needs at least one chain")
        self.chains = [parse_chain(s, seed=seed) for s in ladder]
        self.ladder = [c.spec for c in self.chains]
        self.dim = int(dim)
        if level_bytes is None:
            self.level_bytes = np.array([c.estimate_bytes(self.dim) for c in self.chains], dtype=np.int64)
        else:
            self.level_bytes = np.asarray(level_bytes, dtype=np.int64)
            if self.level_bytes.shape != (len(self.chains),):
                raise ValueError(f"level_bytes has {self.level_bytes.size} sizes for {len(self.chains)} levels")

    def plan(self, uplink_mbps, latency_s, budget_s) -> Plan:
        return choose_levels(self.level_bytes, uplink_mbps, latency_s, budget_s)

    def choose(self, uplink_mbps, latency_s, budget_s) -> np.ndarray:
        """Level index per client (int64 array)."""
        return self.plan(uplink_mbps, latency_s, budget_s).levels
