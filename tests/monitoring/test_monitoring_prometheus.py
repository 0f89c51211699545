import math
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleetlearn.monitoring import PrometheusExporter
from fleetlearn.records import RoundRecord


def scrape(url: str) -> tuple[dict[tuple[str, tuple], float], str]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        ctype = resp.headers["Content-Type"]
        text = resp.read().decode()
    samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, ctype


def test_the_endpoint_of_a_real_run_parses_and_equals_its_records(guarded_run):
    exp, s = guarded_run.monitoring.exporter, guarded_run.summary
    assert exp.url.startswith("http://127.0.0.1:") and exp.port > 0
    m, ctype = scrape(exp.url)
    assert ctype.startswith("text/plain")
    recs, last = s.records, s.records[-1]
    g = lambda name, **labels: m[(name, tuple(sorted(labels.items())))]  # noqa: E731
    assert g("fleetlearn_round") == last.round
    assert g("fleetlearn_model_version") == last.version
    assert g("fleetlearn_accuracy") == last.accuracy and g("fleetlearn_loss") == last.loss
    assert g("fleetlearn_fed_accuracy") == last.fed_accuracy and g("fleetlearn_local_accuracy") == last.local_accuracy
    assert g("fleetlearn_train_loss", phase="before") == last.train_loss_before
    assert g("fleetlearn_uplink_bytes_total") == sum(r.uplink_bytes for r in recs)
    assert g("fleetlearn_downlink_bytes_total") == sum(r.downlink_bytes for r in recs)
    assert g("fleetlearn_clients_selected") == last.selected and g("fleetlearn_clients_accepted") == last.accepted
    for kind in ("dropped", "rejected", "late"):
        assert g(f"fleetlearn_clients_{kind}_total") == sum(getattr(r, kind) for r in recs)
    assert g("fleetlearn_round_duration_seconds", clock="sim") == last.sim_seconds
    assert g("fleetlearn_round_duration_seconds", clock="wall") > 0
    for q, v in (("0.5", last.completion_p50_s), ("0.9", last.completion_p90_s), ("0.99", last.completion_p99_s)):
        assert g("fleetlearn_client_completion_seconds", quantile=q) == v
    assert g("fleetlearn_rounds_total", status="rolled_back") == sum(r.status == "rolled_back" for r in recs) == 2
    assert g("fleetlearn_rounds_total", status="ok") == len(recs) - 2
    n_div = sum(a["detector"] == "divergence" and a["severity"] == "critical" for r in recs for a in r.extra.get("alerts", []))
    assert n_div >= 2 and g("fleetlearn_alerts_total", detector="divergence", severity="critical") == n_div
    dbg = last.extra["debug"]
    assert g("fleetlearn_update_norm", stat="p90") == dbg["update_norm_p90"]
    assert g("fleetlearn_update_variance") == dbg["update_variance"] and g("fleetlearn_model_norm") == dbg["model_norm"]


def test_nan_is_exposed_and_unevaluated_rounds_keep_the_last_accuracy():
    exp = PrometheusExporter()
    other = PrometheusExporter()  # its own registry: no clash with the first
    port = exp.start(0)
    try:
        exp.observe(RoundRecord(round=1, version=1, accuracy=0.5, loss=1.0, uplink_bytes=10, dropped=2, wall_seconds=0.25))
        exp.observe(RoundRecord(round=2, version=2, uplink_bytes=5, dropped=1, wall_seconds=0.5))  # not evaluated
        m, _ = scrape(f"http://127.0.0.1:{port}/metrics")
        assert m[("fleetlearn_round", ())] == 2 and m[("fleetlearn_accuracy", ())] == 0.5
        assert m[("fleetlearn_uplink_bytes_total", ())] == 15 and m[("fleetlearn_clients_dropped_total", ())] == 3
        assert m[("fleetlearn_round_duration_seconds", (("clock", "wall"),))] == 0.5
        assert math.isnan(m[("fleetlearn_client_completion_seconds", (("quantile", "0.5"),))])
        with pytest.raises(RuntimeError, match="already serving"):
            exp.start(0)
    finally:
        exp.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    assert other.registry is not exp.registry
