"""Observability: debug measurements, detectors, guardrails (automatic rollback),
a Prometheus exporter, an HTML/PNG report and a live dashboard.

Everything reads the one record type, `RoundRecord`: hooks add to
``record.extra`` (``debug``, ``alerts``, ``guardrail``) during the round; the
exporter, the report and the dashboard read records (live or from the store).
"""

from __future__ import annotations

from typing import Any

from .dashboard import DashboardServer, serve_dashboard
from .detectors import (
    ALERTS_KEY,
    DETECTORS,
    Alert,
    Detector,
    DivergenceDetector,
    DriftDetector,
    MonitorHook,
    OscillationDetector,
    OutlierUpdateDetector,
    ParticipationCollapseDetector,
    StagnationDetector,
    alerts_of,
    make_detector,
    replay,
    robust_z,
)
from .guardrail import GUARDRAIL_KEY, Guardrail, GuardrailEvent
from .measurements import DEBUG_KEY, DebugMeasurements, debug_of, update_statistics
from .parts import MonitoringParts, MonitoringSettings, build_monitoring
from .probes import PROBE_KEY, ProbeHook
from .prometheus import PrometheusExporter

__all__ = [
    "ALERTS_KEY", "DEBUG_KEY", "PROBE_KEY", "ProbeHook", "DETECTORS", "GUARDRAIL_KEY",
    "Alert", "DashboardServer", "DebugMeasurements", "Detector", "DivergenceDetector", "DriftDetector",
    "Guardrail", "GuardrailEvent", "MonitorHook", "MonitoringParts", "MonitoringSettings",
    "OscillationDetector", "OutlierUpdateDetector", "ParticipationCollapseDetector", "PrometheusExporter",
    "StagnationDetector", "alerts_of", "build_monitoring", "debug_of", "make_detector", "replay",
    "robust_z", "serve_dashboard", "update_statistics", "write_report",
]


def __getattr__(name: str) -> Any:
    # The report imports matplotlib (slow): only when asked for.
    if name == "write_report":
        from .report import write_report

        return write_report
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
