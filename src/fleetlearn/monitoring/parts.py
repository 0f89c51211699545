"""The ``[monitoring]`` settings and `build_monitoring`, which turns them into
the round hooks in the order they must run:

    ProbeHook -> DebugMeasurements -> MonitorHook(detectors) -> Guardrail -> PrivateTelemetryHook -> PrometheusExporter

(probes reject a round computed by a broken part first, measurements feed the detectors, the guardrail acts on their alerts, and the
exporter publishes the round as finally recorded, rollback included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import MonitoringConfig
from .detectors import MonitorHook, make_detector
from .guardrail import Guardrail
from .measurements import DebugMeasurements
from .probes import ProbeHook
from .prometheus import PrometheusExporter


# The [monitoring] settings are the config's section itself (one definition, its bounds included).
MonitoringSettings = MonitoringConfig


@dataclass
class MonitoringParts:
    debug: DebugMeasurements | None
    monitor: MonitorHook | None
    guardrail: Guardrail | None
    exporter: PrometheusExporter | None
    settings: MonitoringConfig
    probe: ProbeHook | None = None
    telemetry: Any = None  # fleetlearn.privacy.PrivateTelemetryHook, set by the factory when privacy asks for it

    @property
    def hooks(self) -> list:
        """The round hooks, in the order they must run."""
        return [h for h in (self.probe, self.debug, self.monitor, self.guardrail, self.telemetry, self.exporter) if h is not None]

    def start(self) -> int | None:
        """Start the Prometheus endpoint if configured; returns its port."""
        if self.exporter is None or self.settings.prometheus_port is None:
            return None
        return start_exporter(self.exporter, self.settings.prometheus_port, self.settings.prometheus_host)

    def stop(self) -> None:
        if self.exporter is not None:
            self.exporter.stop()


def start_exporter(exporter: PrometheusExporter, port: int, host: str) -> int:
    """``exporter.start(port, host)``; a port taken since the config was checked (or an address
    that went away) is a ConfigError naming the key, for the run and for a waiting standby alike."""
    try:
        return exporter.start(port, host)
    except OSError as exc:
        from ..errors import ConfigError

        raise ConfigError(f"monitoring.prometheus_port = {port}: cannot serve /metrics on {host}:{port}: {exc.strerror or exc}") from None


def build_monitoring(settings: MonitoringConfig | dict[str, Any] | None = None) -> MonitoringParts:
    """The round hooks of ``[monitoring]`` settings: the run's section, or a dict of its keys
    (validated as the config validates them: a refusal is a ConfigError naming the key)."""
    s = settings if isinstance(settings, MonitoringConfig) else MonitoringConfig.model_validate(settings or {})
    flat = s.model_dump()
    detectors = [make_detector(n, flat) for n in s.detectors]
    monitor = MonitorHook(detectors) if detectors else None
    guardrail = None
    if s.guardrail:
        guardrail = Guardrail(
            s.guardrail, lr_factor=s.guardrail_lr_factor, min_lr=s.guardrail_min_lr,
            clip_factor=s.guardrail_clip_factor, exclude_rounds=s.guardrail_exclude_rounds,
            min_severity=s.guardrail_min_severity,
        )
    exporter = PrometheusExporter() if s.prometheus_port is not None else None
    probe = ProbeHook(s.probe_updates, rollback=s.probe_updates_rollback) if s.probe_updates else None
    return MonitoringParts(DebugMeasurements() if s.debug else None, monitor, guardrail, exporter, s, probe)
