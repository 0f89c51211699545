"""A real Prometheus (Debian's `prometheus` package) scrapes a running fleetlearn run and
answers for its metrics through the HTTP query API; the shipped alert rules
(deploy/prometheus/alerts.yml) load and evaluate against those live metrics.

.ci/run installs the package when missing; without it (and no way to install it) the
test skips and says so.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from fleetlearn.config import load_config
from fleetlearn.engine import build_coordinator

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
ROUNDS = 2
WAIT_S = 25.0

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.skip("Debian's `prometheus` package is not installed (.ci/run installs it: apt-get install prometheus)")
    return path


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return body["data"]


def until(what: str, probe, deadline: float):
    """Call probe() until it returns something truthy; fail naming `what` at the deadline."""
    last = None
    while time.monotonic() < deadline:
        try:
            answer = probe()
        except OSError as exc:  # Prometheus still starting: not an answer, ask again
            last = exc
        else:
            if answer:
                return answer
            last = answer
        time.sleep(0.25)
    pytest.fail(f"Prometheus did not report {what} within {WAIT_S}s (last answer: {last!r})")


def test_prometheus_scrapes_a_running_run_and_evaluates_the_shipped_rules(tmp_path):
    binary = prometheus_binary()
    metrics_port, prom_port = free_port(), free_port()
    (tmp_path / "alerts.yml").write_text(RULES.read_text())
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "rule_files:\n  - alerts.yml\n"
        "scrape_configs:\n  - job_name: fleetlearn\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{metrics_port}']\n"
    )
    prom = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("w"),
    )
    api = f"http://127.0.0.1:{prom_port}/api/v1"

    def query(expr: str) -> list:
        return get(f"{api}/query?" + urllib.parse.urlencode({"query": expr}))["result"]

    cfg = {"data": {"clients": 10}, "server": {"rounds": ROUNDS, "cohort": 4},
           "monitoring": {"prometheus_port": metrics_port}}
    coordinator = build_coordinator(load_config(cfg), store=False)
    records, scraped, failure = [], threading.Event(), []

    def on_round(record):
        records.append(record)
        if record.round == ROUNDS:  # keep the run (and its /metrics) up until Prometheus has read it
            scraped.wait(WAIT_S)

    def run():
        try:
            coordinator.run(on_round)
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            failure.append(exc)

    t_start = time.time()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    try:
        deadline = time.monotonic() + WAIT_S
        until(f"fleetlearn_round == {ROUNDS}",
              lambda: [r for r in query("fleetlearn_round") if float(r["value"][1]) == ROUNDS], deadline)
        assert not failure, failure
        last = records[-1]

        def value(expr: str) -> float:
            result = query(expr)
            assert len(result) == 1, (expr, result)
            return float(result[0]["value"][1])

        # What Prometheus stored is what the run recorded.
        assert value('up{job="fleetlearn"}') == 1
        assert value("fleetlearn_clients_selected") == last.selected
        assert value("fleetlearn_clients_accepted") == last.accepted
        assert value("fleetlearn_model_version") == last.version
        assert value("fleetlearn_uplink_bytes_total") == sum(r.uplink_bytes for r in records) > 0
        assert value("fleetlearn_downlink_bytes_total") == sum(r.downlink_bytes for r in records) > 0
        assert value('fleetlearn_rounds_total{status="ok"}') == sum(r.status == "ok" for r in records)
        assert value("fleetlearn_accuracy") == pytest.approx(last.accuracy)
        assert value("fleetlearn_leader") == 1
        assert t_start <= value("fleetlearn_last_round_timestamp_seconds") <= time.time()

        # The shipped rules load, and with a live leader that just finished a round,
        # neither "no leader" nor "stalled round" fires.
        rules = get(f"{api}/rules")["groups"]
        names = {r["name"] for g in rules for r in g["rules"]}
        assert {"FleetlearnDivergence", "FleetlearnParticipationCollapse", "FleetlearnUplinkBandwidthHigh",
                "FleetlearnClientLatencyP99High", "FleetlearnRoundStalled", "FleetlearnNoLeader"} <= names

        def states():
            out = {r["name"]: r["state"] for g in get(f"{api}/rules")["groups"] for r in g["rules"]}
            # "no leader" is pending until the first scrape: wait for an evaluation after it
            return out if out["FleetlearnNoLeader"] == "inactive" else None

        final = until("FleetlearnNoLeader inactive", states, time.monotonic() + WAIT_S)
        assert final["FleetlearnRoundStalled"] == "inactive"
        assert final["FleetlearnDivergence"] == "inactive"
    finally:
        scraped.set()
        worker.join(WAIT_S)
        prom.terminate()
        try:
            prom.wait(10)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait()
    assert not worker.is_alive() and not failure, failure
