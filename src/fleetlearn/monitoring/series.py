"""Round records as columns: what the report and the dashboard plot.

One function turns a list of RoundRecords into a dict of equal-length lists
(NaN where a round did not measure something), plus the alert, rollback and
guardrail events, so both readers agree on names and meaning.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from ..records import RoundRecord
from .detectors import alerts_of
from .guardrail import GUARDRAIL_KEY
from .measurements import debug_of, num

RECORD_COLUMNS = (
    "round", "version", "accuracy", "loss", "fed_accuracy", "fed_accuracy_p10", "local_accuracy",
    "train_loss_before", "train_loss_after", "selected", "accepted", "dropped", "rejected", "late",
    "uplink_bytes", "downlink_bytes", "sim_seconds", "wall_seconds", "deadline_s",
    "completion_p50_s", "completion_p90_s", "completion_p99_s", "update_norm_mean", "update_norm_max",
)
DEBUG_COLUMNS = (
    "update_norm_min", "update_norm_p50", "update_norm_p90", "update_norm_max", "update_variance",
    "cosine_mean", "cosine_std", "weight_divergence_mean", "pairwise_distance_mean", "model_norm", "step_norm",
)


def columns(records: Sequence[RoundRecord]) -> dict[str, list[float]]:
    """{name: [value per round]} for RECORD_COLUMNS, ``debug_<name>`` for DEBUG_COLUMNS,
    and ``status`` (strings)."""
    out: dict[str, list[Any]] = {k: [num(getattr(r, k)) for r in records] for k in RECORD_COLUMNS}
    for k in DEBUG_COLUMNS:
        out["debug_" + k] = [num(debug_of(r).get(k)) for r in records]
    out["status"] = [r.status for r in records]
    return out


def events(records: Sequence[RoundRecord]) -> dict[str, list[dict[str, Any]]]:
    """Alerts, rollbacks, failed rounds, guardrail actions and canary decisions, each with its round."""
    alerts, rollbacks, failed, guard, canary = [], [], [], [], []
    for r in records:
        for a in alerts_of(r):
            alerts.append({"round": r.round, "detector": a.get("detector"), "severity": a.get("severity"), "message": a.get("message", ""), "clients": a.get("clients") or []})
        if r.status == "rolled_back":
            rollbacks.append({"round": r.round, "version": r.version, "rejected_version": r.extra.get("rejected_version"), "reason": r.reason})
        elif r.status == "failed":
            failed.append({"round": r.round, "reason": r.reason})
        g = r.extra.get(GUARDRAIL_KEY)
        if isinstance(g, dict) and g.get("fired"):
            guard.append({"round": r.round, **g})
        c = r.extra.get("canary")
        if isinstance(c, dict) and isinstance(c.get("decision"), dict):
            canary.append(c["decision"])
    return {"alerts": alerts, "rollbacks": rollbacks, "failed": failed, "guardrail": guard, "canary": canary}


def json_safe(obj: Any) -> Any:
    """NaN/inf -> None, recursively (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
