"""The ``[monitoring]`` settings and `build_monitoring`, which turns them into
the round hooks in the order they must run:

    ProbeHook -> DebugMeasurements -> MonitorHook(detectors) -> Guardrail -> PrivateTelemetryHook -> PrometheusExporter

(probes reject a round computed by a broken part first, measurements feed the detectors, the guardrail acts on their alerts, and the
exporter publishes the round as finally recorded, rollback included).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from .detectors import DETECTORS, MonitorHook, make_detector
from .guardrail import Guardrail
from .measurements import DebugMeasurements
from .probes import ProbeHook
from .prometheus import PrometheusExporter


@dataclass
class MonitoringSettings:
    debug: bool = True  # DebugMeasurements into record.extra["debug"]
    detectors: list[str] = field(default_factory=lambda: list(DETECTORS))
    # Detector thresholds (see each detector's docstring in detectors.py).
    divergence_patience: int = 3
    divergence_min_rise: float = 0.0
    divergence_max_ratio: float | None = 3.0
    divergence_param_growth: float | None = 10.0
    divergence_warn_ratio: float = 2.0
    oscillation_window: int = 8
    oscillation_amplitude: float = 0.02
    oscillation_min_flips: int = 4
    oscillation_min_gain: float = 0.005
    stagnation_window: int = 10
    stagnation_eps: float = 0.005
    outlier_threshold: float = 4.5
    outlier_alarm_threshold: float = 10.0
    outlier_persistence: int = 2
    outlier_window: int = 3
    outlier_min_count: int = 3
    outlier_min_clients: int = 10
    outlier_min_history: int = 2
    outlier_spread_rounds: int = 10
    outlier_ewma: float = 0.3
    outlier_max_clients: int = 100_000
    participation_min_fraction: float = 0.5
    participation_drop_fraction: float = 0.5
    participation_window: int = 5
    drift_threshold: float = 0.15
    drift_patience: int = 2
    drift_metric: str = "accuracy"
    # Guardrail: the detectors whose alerts roll a round back ([] = no guardrail) and the responses.
    guardrail: list[str] = field(default_factory=lambda: ["divergence"])
    guardrail_lr_factor: float | None = None
    guardrail_min_lr: float = 0.0
    guardrail_clip_factor: float | None = None
    guardrail_exclude_rounds: int = 0
    guardrail_min_severity: str = "warning"  # the guardrail acts on alerts this severe or more
    # Prometheus /metrics on prometheus_host:prometheus_port (None: no endpoint; 0: a free port).
    prometheus_port: int | None = None
    prometheus_host: str = "127.0.0.1"
    # Probe updates (see probes.py): how many per round (0: off) and whether a failure rejects the round.
    probes: int = 0
    probe_rollback: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "MonitoringSettings":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown monitoring settings: {', '.join(unknown)}")
        return cls(**d)

    def validate(self) -> None:
        for name in list(self.detectors) + list(self.guardrail):
            if name not in DETECTORS:
                raise ValueError(f"monitoring: unknown detector {name!r}; allowed: {', '.join(DETECTORS)}")
        missing = sorted(set(self.guardrail) - set(self.detectors))
        if missing:
            raise ValueError(f"monitoring.guardrail names detectors that are not in monitoring.detectors: {', '.join(missing)}")


@dataclass
class MonitoringParts:
    debug: DebugMeasurements | None
    monitor: MonitorHook | None
    guardrail: Guardrail | None
    exporter: PrometheusExporter | None
    settings: MonitoringSettings
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


def build_monitoring(settings: MonitoringSettings | dict[str, Any] | None = None) -> MonitoringParts:
    s = settings if isinstance(settings, MonitoringSettings) else MonitoringSettings.from_dict(settings)
    s.validate()
    flat = {f.name: getattr(s, f.name) for f in fields(s)}
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
    probe = ProbeHook(s.probes, rollback=s.probe_rollback) if s.probes else None
    return MonitoringParts(DebugMeasurements() if s.debug else None, monitor, guardrail, exporter, s, probe)
