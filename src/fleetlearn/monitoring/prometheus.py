"""Prometheus exporter: the latest round's numbers as metrics, served on /metrics.

Names follow the Prometheus conventions (https://prometheus.io/docs/practices/naming/):
a ``fleetlearn_`` prefix, base units (seconds, bytes), ``_total`` on counters.
Per-round quantities are gauges holding the latest round's value; run totals
are counters.  Completion-time percentiles are gauges with a ``quantile``
label, as a summary's precomputed quantiles would be exposed.

Each exporter has its own `CollectorRegistry`, so several runs (or tests) in one
process do not collide in the library's global registry.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from ..records import RoundRecord
from .detectors import alerts_of
from .measurements import debug_of, num


class PrometheusExporter:
    """RoundHook (or call `observe(record)` from ``on_round``) that updates the metrics;
    `start(port)` serves them on http://127.0.0.1:port/metrics (port 0: a free port)."""

    name = "prometheus"

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        g = lambda name, doc, labels=(): Gauge(name, doc, labels, registry=reg)  # noqa: E731
        c = lambda name, doc, labels=(): Counter(name, doc, labels, registry=reg)  # noqa: E731
        self.round = g("fleetlearn_round", "Last finished round")
        self.version = g("fleetlearn_model_version", "Model version after the last round")
        self.accuracy = g("fleetlearn_accuracy", "Central held-out accuracy of the global model (last evaluated round)")
        self.loss = g("fleetlearn_loss", "Central held-out loss of the global model (last evaluated round)")
        self.fed_accuracy = g("fleetlearn_fed_accuracy", "Mean accuracy of the global model on clients' local test splits")
        self.local_accuracy = g("fleetlearn_local_accuracy", "Mean accuracy of the clients' local models on their own test splits")
        self.train_loss = g("fleetlearn_train_loss", "Client-reported local training loss, mean over accepted clients", ["phase"])
        self.uplink = c("fleetlearn_uplink_bytes", "Bytes sent by clients to the server")
        self.downlink = c("fleetlearn_downlink_bytes", "Bytes sent by the server to clients")
        self.selected = g("fleetlearn_clients_selected", "Clients selected in the last round")
        self.accepted = g("fleetlearn_clients_accepted", "Client updates accepted in the last round")
        self.dropped = c("fleetlearn_clients_dropped", "Selected clients that dropped out")
        self.rejected = c("fleetlearn_clients_rejected", "Client updates refused by validation")
        self.late = c("fleetlearn_clients_late", "Client updates that arrived after the deadline or were not needed")
        self.duration = g("fleetlearn_round_duration_seconds", "Duration of the last round", ["clock"])
        self.completion = g("fleetlearn_client_completion_seconds", "Client completion time after dispatch in the last round (simulated or real seconds)", ["quantile"])
        self.rounds = c("fleetlearn_rounds", "Rounds finished, by status", ["status"])
        self.alerts = c("fleetlearn_alerts", "Detector alerts", ["detector", "severity"])
        self.update_norm = g("fleetlearn_update_norm", "Distribution of the accepted update norms in the last round", ["stat"])
        self.update_variance = g("fleetlearn_update_variance", "Weighted variance of the updates around their mean, trace / d")
        self.update_cosine = g("fleetlearn_update_cosine", "Cosine of the updates to the aggregate", ["stat"])
        self.model_norm = g("fleetlearn_model_norm", "L2 norm of the global model")
        self.step_norm = g("fleetlearn_step_norm", "L2 norm of the last server step")
        # Liveness for operators (deploy/prometheus/alerts.yml): a stalled round is
        # time() - fleetlearn_last_round_timestamp_seconds growing; "no leader" is no
        # process reporting fleetlearn_leader 1.  A serving process is the leader today
        # (one server per run); the leader lease (issue 18, item 1) sets it with `set_leader`.
        self.last_round_time = g("fleetlearn_last_round_timestamp_seconds", "Unix time at which the last round finished")
        self.leader = g("fleetlearn_leader", "1 while this process is the run's leader (commits rounds), 0 on a standby")
        self._httpd = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._last_call: float | None = None
        self.port: int | None = None
        self.host = "127.0.0.1"

    # -- updating --------------------------------------------------------------------
    def after_round(self, record: RoundRecord, coordinator: Any = None) -> None:
        self.observe(record)

    def observe(self, record: RoundRecord) -> None:
        now = time.perf_counter()
        wall = num(record.wall_seconds)
        if not wall > 0 and self._last_call is not None:
            # As a hook the record's wall time is not set yet (the engine sets it after the
            # hooks): the time since the previous round's hooks is this round's wall time.
            wall = now - self._last_call
        self._last_call = now
        with self._lock:
            self.last_round_time.set(time.time())
            self.round.set(record.round)
            self.version.set(record.version)
            if math.isfinite(num(record.accuracy)):
                self.accuracy.set(record.accuracy)
            if math.isfinite(num(record.loss)) or math.isinf(num(record.loss)):
                self.loss.set(record.loss)
            for gauge, v in ((self.fed_accuracy, record.fed_accuracy), (self.local_accuracy, record.local_accuracy)):
                if math.isfinite(num(v)):
                    gauge.set(v)
            self.train_loss.labels(phase="before").set(num(record.train_loss_before))
            self.train_loss.labels(phase="after").set(num(record.train_loss_after))
            self.uplink.inc(max(int(record.uplink_bytes), 0))
            self.downlink.inc(max(int(record.downlink_bytes), 0))
            self.selected.set(record.selected)
            self.accepted.set(record.accepted)
            self.dropped.inc(record.dropped)
            self.rejected.inc(record.rejected)
            self.late.inc(record.late)
            self.duration.labels(clock="sim").set(num(record.sim_seconds))
            self.duration.labels(clock="wall").set(wall)
            for q, v in (("0.5", record.completion_p50_s), ("0.9", record.completion_p90_s), ("0.99", record.completion_p99_s)):
                self.completion.labels(quantile=q).set(num(v))
            self.rounds.labels(status=record.status).inc()
            for a in alerts_of(record):
                self.alerts.labels(detector=str(a.get("detector")), severity=str(a.get("severity"))).inc()
            dbg = debug_of(record)
            for stat in ("min", "p50", "p90", "max"):
                self.update_norm.labels(stat=stat).set(num(dbg.get(f"update_norm_{stat}")))
            self.update_variance.set(num(dbg.get("update_variance")))
            self.update_cosine.labels(stat="mean").set(num(dbg.get("cosine_mean")))
            self.update_cosine.labels(stat="std").set(num(dbg.get("cosine_std")))
            self.model_norm.set(num(dbg.get("model_norm")))
            self.step_norm.set(num(dbg.get("step_norm")))

    # -- serving ---------------------------------------------------------------------
    def start(self, port: int = 0, host: str = "127.0.0.1") -> int:
        """Serve /metrics on host:port in a daemon thread; returns the bound port
        (port 0 asks the OS for a free one)."""
        if self._httpd is not None:
            raise RuntimeError(f"the exporter is already serving on port {self.port}")
        self._httpd, self._thread = start_http_server(int(port), addr=host, registry=self.registry)
        self.port = int(self._httpd.server_port)
        self.host = host
        self._last_call = time.perf_counter()
        self.set_leader(True)
        return self.port

    def set_leader(self, leader: bool) -> None:
        """Report whether this process leads the run (``fleetlearn_leader``)."""
        self.leader.set(1 if leader else 0)

    @property
    def url(self) -> str | None:
        return None if self.port is None else f"http://{self.host}:{self.port}/metrics"

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = self._thread = None
        self.port = None
