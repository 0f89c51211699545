"""Private telemetry: the clients' self-reported statistics (loss before and after
local training, local accuracy, update norm) leave the server only as noised
cohort means, and each release is counted in the privacy budget.

Mechanism (the Gaussian mechanism on bounded sums, as DP-FedAvg does for the
model; McMahan et al., ICLR 2018): client ``i`` contributes, for each statistic
``j`` with bound ``B_j``, the pair ``(clip(s_ij, 0, B_j) / B_j, 1)`` if it
reported ``s_ij`` and ``(0, 0)`` otherwise.  Adding or removing one client moves
each of the ``2k`` sums by at most 1, so the L2 sensitivity is ``sqrt(2k)``; each
sum gets ``N(0, (z sqrt(2k))^2)`` noise and the released mean is
``B_j * noisy_sum_j / max(noisy_count_j, 1)``.  One release per round is a
Gaussian mechanism with noise multiplier ``z`` on the same sampled cohort as the
model update, composed in the run's accountant as one more subsampled Gaussian
event (so epsilon grows faster than with the model alone).

Threat model: central DP's trusted server.  The server process sees the replies
(the guardrail and detectors act on them); what is stored, exported to Prometheus
and shown in reports is private: the hook replaces the record's client-reported
means by the noised ones and blanks the per-client statistics (client records and
the debug measurements' per-client rows).  Place it after the guardrail and
before the exporter.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..records import RoundRecord

TELEMETRY_STATS = ("loss_before", "loss_after", "accuracy", "update_norm")
RECORD_FIELDS = {"loss_before": "train_loss_before", "loss_after": "train_loss_after", "accuracy": "local_accuracy", "update_norm": "update_norm_mean"}
TELEMETRY_KEY = "telemetry"


class PrivateTelemetry:
    """Noised cohort means of bounded client statistics (see the module docstring)."""

    name = "private_telemetry"

    def __init__(self, noise_multiplier: float, bounds: dict[str, float], seed: int = 0):
        if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
            raise ValueError(f"telemetry noise multiplier must be finite and > 0, got {noise_multiplier!r}")
        bad = {k: v for k, v in bounds.items() if k not in TELEMETRY_STATS or not (math.isfinite(v) and v > 0)}
        if bad or not bounds:
            raise ValueError(f"telemetry bounds must be finite and > 0 for statistics in {TELEMETRY_STATS}, got {bounds!r}")
        self.noise_multiplier = float(noise_multiplier)
        self.names = tuple(k for k in TELEMETRY_STATS if k in bounds)
        self.bounds = np.array([float(bounds[k]) for k in self.names])
        self.seed = int(seed)

    @property
    def noise_std(self) -> float:
        """Per-sum standard deviation: z times the L2 sensitivity sqrt(2k)."""
        return self.noise_multiplier * math.sqrt(2 * len(self.names))

    def release(self, stats: np.ndarray, round: int) -> dict[str, float]:
        """`stats`: (n clients, k statistics in `names` order), NaN where not reported.
        Returns the noised mean of each statistic."""
        stats = np.asarray(stats, dtype=np.float64).reshape(-1, len(self.names))
        present = np.isfinite(stats)
        scaled = np.where(present, np.clip(np.nan_to_num(stats, nan=0.0, posinf=0.0, neginf=0.0), 0.0, self.bounds) / self.bounds, 0.0)
        sums, counts = scaled.sum(axis=0), present.sum(axis=0).astype(np.float64)
        rng = np.random.default_rng([self.seed, 0x7E1E, int(round)])
        noise = rng.normal(0.0, self.noise_std, size=(2, len(self.names)))
        means = self.bounds * np.clip((sums + noise[0]) / np.maximum(counts + noise[1], 1.0), 0.0, 1.0)
        return {k: float(v) for k, v in zip(self.names, means)}


class PrivateTelemetryHook:
    """RoundHook: release the round's client statistics through `PrivateTelemetry`,
    compose the release in the coordinator's privacy accountant, and keep only the
    noised means in the record."""

    name = "private_telemetry"

    def __init__(self, telemetry: PrivateTelemetry):
        self.telemetry = telemetry

    def after_round(self, record: RoundRecord, coordinator: Any) -> None:
        t = self.telemetry
        replied = [c for c in record.clients if c.status in ("accepted", "rejected", "late")]
        if not replied:
            return
        stats = np.array([[getattr(c, k) for k in t.names] for c in replied], dtype=np.float64)
        noised = t.release(stats, record.round)
        for k, v in noised.items():
            setattr(record, RECORD_FIELDS[k], v)
        record.update_norm_max = math.nan
        for c in record.clients:
            c.loss_before = c.loss_after = c.accuracy = c.update_norm = math.nan
        debug = record.extra.get("debug")
        if isinstance(debug, dict) and "clients" in debug:
            debug["clients"] = {}
        info: dict[str, Any] = {"noise_multiplier": t.noise_multiplier, "statistics": list(t.names), **{f"{k}_mean": v for k, v in noised.items()}}
        privacy = getattr(coordinator, "privacy", None)
        accountant = getattr(privacy, "accountant", None)
        if accountant is not None:
            kind, q = coordinator.round_sampling  # the same sampling event as the round's model release
            accountant.record_round(q, t.noise_multiplier, sampling=kind)
            record.extra.update(accountant.spent().to_metrics())  # the epsilon spent, telemetry included
        record.extra[TELEMETRY_KEY] = info
