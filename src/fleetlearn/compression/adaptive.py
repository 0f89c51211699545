"""Adaptive compression: each client's codec level from its uplink and the round's time budget.

Contract
--------
The policy is configured with a *ladder* of chains ordered from least to most
lossy (e.g. ``["none", "q8", "q4:stochastic", "q2:stochastic", "ef | topk:0.16,block=16 | q2 | zstd"]``,
the default of ``[compression] ladder``) and the
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

Two policies use this rule (``[compression] adaptive_policy``):

- ``upload_budget``: the budget is a fixed number of upload seconds
  (``upload_budget_s``) or the round's deadline minus each client's download and
  compute time.  When the deadline is generous every upload fits and everybody
  keeps the least lossy rung: the round is then as slow as without compression.
- ``pace`` (`pace_levels`): the budget comes from the cohort itself.  A round ends
  when its ``wait_for``-th reply arrives (the cohort size, out of the
  over-selected clients dispatched), so that is the arrival worth speeding up.
  Each client's earliest finish is ``t_min[i] = before_s[i] + min_j upload_s[i, j]``
  (``before_s`` = download + compute; the minimum is at the smallest rung, normally
  the last); the
  pace of the round is ``T = (1 + slack) * (wait_for-th smallest t_min)``, capped by
  the deadline; each client then gets the least lossy rung with
  ``before_s[i] + upload_s[i, j] <= T``.  So the round ends about as early as if
  everybody used the most compressed rung, while every client with time to spare
  (fast links, fast devices) sends at higher precision: slow links get aggressive
  codecs, fast links keep precision.  ``slack`` trades round time for precision
  (0: the earliest possible end; 0.25: rounds up to 25 % longer than that).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .codec import parse_chain


@dataclass(frozen=True)
class Plan:
    levels: np.ndarray  # int64 (n,): index into the ladder
    fits: np.ndarray  # bool (n,): the chosen level's upload fits the budget
    upload_s: np.ndarray  # float64 (n,): upload seconds at the chosen level


def _upload_seconds(level_bytes, uplink_mbps, latency_s, *per_client) -> tuple[np.ndarray, ...]:
    """Validated inputs -> (upload seconds (n, L), per-client arrays broadcast to (n,)...)."""
    b = np.asarray(level_bytes, dtype=np.float64)
    if b.ndim != 1 or b.size == 0:
        raise ValueError("level_bytes must be a non-empty 1-D sequence (one size per ladder level)")
    if np.any(b < 0) or not np.all(np.isfinite(b)):
        raise ValueError("level_bytes must be finite and >= 0")
    arrays = np.broadcast_arrays(
        np.atleast_1d(np.asarray(uplink_mbps, dtype=np.float64)),
        np.atleast_1d(np.asarray(latency_s, dtype=np.float64)),
        *(np.atleast_1d(np.asarray(a, dtype=np.float64)) for a in per_client),
    )
    mbps, lat = arrays[0], arrays[1]
    if mbps.ndim != 1:
        raise ValueError("uplink_mbps, latency_s and the per-client times must be scalars or 1-D arrays of one length")
    if not (np.all(np.isfinite(mbps)) and np.all(mbps > 0)):
        raise ValueError("uplink_mbps must be finite and > 0")
    if not (np.all(np.isfinite(lat)) and np.all(lat >= 0)):
        raise ValueError("latency_s must be finite and >= 0")
    secs = lat[:, None] + b[None, :] * 8.0 / (mbps[:, None] * 1e6)  # (n, L)
    return (secs, *arrays[2:])


def _least_lossy(finish: np.ndarray, limit: np.ndarray | float, upload: np.ndarray) -> Plan:
    ok = finish <= np.asarray(limit)[..., None] if np.ndim(limit) else finish <= limit
    fits = ok.any(axis=1)
    levels = np.where(fits, ok.argmax(axis=1), finish.shape[1] - 1).astype(np.int64)
    return Plan(levels, fits, upload[np.arange(upload.shape[0]), levels])


def choose_levels(
    level_bytes: Sequence[int] | np.ndarray,
    uplink_mbps: np.ndarray | float,
    latency_s: np.ndarray | float,
    budget_s: np.ndarray | float,
) -> Plan:
    """The least lossy level whose upload fits each client's budget (see the module docstring)."""
    secs, bud = _upload_seconds(level_bytes, uplink_mbps, latency_s, budget_s)
    if np.any(np.isnan(bud)):
        raise ValueError("budget_s must not be NaN")
    return _least_lossy(secs, bud, secs)


def pace_levels(
    level_bytes: Sequence[int] | np.ndarray,
    uplink_mbps: np.ndarray | float,
    latency_s: np.ndarray | float,
    before_s: np.ndarray | float,
    wait_for: int,
    slack: float = 0.05,
    deadline_s: float | None = None,
) -> Plan:
    """The ``pace`` policy (see the module docstring): least lossy rung that finishes by
    ``T = (1 + slack) * (wait_for-th smallest earliest finish)``, T capped by the deadline.

    ``before_s``: each client's seconds before its upload starts (download + compute).
    ``Plan.upload_s`` is the upload time at the chosen rung; ``fits`` says whether the
    client finishes by T.
    """
    if not isinstance(wait_for, (int, np.integer)) or isinstance(wait_for, bool) or wait_for < 1:
        raise ValueError(f"wait_for must be an integer >= 1, got {wait_for!r}")
    if not (isinstance(slack, (int, float, np.floating)) and math.isfinite(slack) and slack >= 0):
        raise ValueError(f"slack must be a finite number >= 0, got {slack!r}")
    if deadline_s is not None and not (deadline_s > 0):
        raise ValueError(f"deadline_s must be > 0 or None, got {deadline_s!r}")
    secs, before = _upload_seconds(level_bytes, uplink_mbps, latency_s, before_s)
    if not (np.all(np.isfinite(before)) and np.all(before >= 0)):
        raise ValueError("before_s must be finite and >= 0")
    n = secs.shape[0]
    finish = before[:, None] + secs  # (n, L): download + compute + upload at each rung
    if n == 0:
        return _least_lossy(finish, 0.0, secs)
    # Earliest finish of each client: its smallest payload.  The round waits for `wait_for` replies.
    t_min = finish.min(axis=1)
    k = min(int(wait_for), n)
    target = (1.0 + float(slack)) * float(np.partition(t_min, k - 1)[k - 1])
    if deadline_s is not None:
        target = min(target, float(deadline_s))
    return _least_lossy(finish, target, secs)


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
        mixed = [c.spec for c in self.chains if c.coverage]
        if mixed:
            raise ValueError(f"{mixed[0]!r} sends a random subset of each update, averaged per coordinate over the clients that "
                             "sent it; a ladder mixes chains in one round, and the others' rows are averaged whole: not a rung")
        self.dim = int(dim)
        if level_bytes is None:
            self.level_bytes = np.array([c.estimate_bytes(self.dim) for c in self.chains], dtype=np.int64)
        else:
            self.level_bytes = np.asarray(level_bytes, dtype=np.int64)
            if self.level_bytes.shape != (len(self.chains),):
                raise ValueError(f"level_bytes has {self.level_bytes.size} sizes for {len(self.chains)} levels")

    def plan(self, uplink_mbps, latency_s, budget_s) -> Plan:
        return choose_levels(self.level_bytes, uplink_mbps, latency_s, budget_s)

    def pace(self, uplink_mbps, latency_s, before_s, wait_for: int, slack: float = 0.05, deadline_s: float | None = None) -> Plan:
        """The ``pace`` policy for one round's cohort (see `pace_levels`)."""
        return pace_levels(self.level_bytes, uplink_mbps, latency_s, before_s, wait_for, slack, deadline_s)

    def plan_task(self, entry, uplink_mbps, latency_s, before_s) -> Plan | None:
        """The rungs a Task's adaptive entry (`fleetlearn.task_spec.AdaptiveEntry`) asks for,
        one per client: ``policy = "pace"`` (``wait_for``, ``slack``, ``deadline_s``) or an
        upload budget (``upload_budget_s``; minus ``before_s`` when ``budget_is_deadline``).
        None when the entry sets no budget (every client then sends the run's uplink chain).

        ``before_s``: each client's seconds before its upload starts (download + compute),
        exact in the simulation, measured on earlier rounds over gRPC.  The one rule both
        transports use (fleetlearn.transport.simulation, fleetlearn.transport.grpc.server).
        """
        if entry is None:
            return None
        if entry.policy == "pace":
            if entry.wait_for is None:
                return None
            return self.pace(uplink_mbps, latency_s, before_s, int(entry.wait_for), float(entry.slack), entry.deadline_s)
        budget = entry.upload_budget_s
        if budget is None:
            return None
        before = np.atleast_1d(np.asarray(before_s, dtype=np.float64))
        budget = budget - before if entry.budget_is_deadline else np.broadcast_to(float(budget), before.shape)
        return self.plan(uplink_mbps, latency_s, budget)

    def choose(self, uplink_mbps, latency_s, budget_s) -> np.ndarray:
        """Level index per client (int64 array)."""
        return self.plan(uplink_mbps, latency_s, budget_s).levels
