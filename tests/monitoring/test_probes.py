"""Probe clients in the simulation (monitoring/probe_clients.py): devices with known synthetic
data whose updates the server predicts and checks after the decoder and the validators.

A tampered probe (its labels flipped, its codec broken: the FLEETLEARN_PROBE_TAMPER test
hook) is flagged in the round it sends; honest probes raise nothing over 50 rounds; and no
probe update ever enters the model (the model equals the run without probes, bit for bit)."""

from __future__ import annotations

import pytest
import torch

from fleetlearn.client.probe import TAMPER_ENV, probe_data
from fleetlearn.config import ConfigError, load_config
from fleetlearn.engine import build_coordinator
from fleetlearn.monitoring.detectors import alerts_of
from fleetlearn.monitoring.probe_clients import PROBE_CLIENTS_KEY, PROBE_STATUS

TINY = {
    "seed": 1, "data": {"clients": 6, "partition": "iid"}, "model": {"name": "logistic"},
    "server": {"rounds": 2, "cohort": 3, "eval_every": 1000}, "client": {"local_epochs": 1, "batch_size": 16},
    "monitoring": {"detectors": []},
}


def _config(rounds: int, probes: int, **sections):
    data = {**TINY, **sections, "server": {**TINY["server"], "rounds": rounds, **sections.get("server", {})}}
    if probes:
        data["probes"] = {"clients": probes}
    return load_config(data)


def _run(rounds: int, probes: int, **sections):
    c = build_coordinator(_config(rounds, probes, **sections), store=False)
    return c, c.run()


def _probe_alerts(record):
    return [a for a in alerts_of(record) if a["detector"] == "probe_client"]


def test_honest_probes_raise_no_alert_over_50_rounds_and_never_enter_the_model(monkeypatch):
    monkeypatch.delenv(TAMPER_ENV, raising=False)
    lossy = {"compression": {"uplink": "ef | topk:0.2 | q8"}}  # a lossy, stateful, error-feedback chain
    c, s = _run(50, 2, **lossy)
    base, _ = _run(50, 0, **lossy)
    probes = [6, 7]  # after the 6 real clients
    for r in s.records:
        info = r.extra[PROBE_CLIENTS_KEY]
        assert (info["selected"], info["checked"], info["ok"], info["failed"]) == (2, 2, True, []), (r.round, info)
        assert info["max_error"] < 0.01  # float noise and a rare rounding flip of the lossy chain, not drift
        assert not _probe_alerts(r)
        assert r.selected == 3 and r.accepted == 3  # the cohort is the real clients; probes are checked, not accepted
        assert sorted(x.client_id for x in r.clients if x.status == PROBE_STATUS) == probes
        assert all(x.weight == 0.0 for x in r.clients if x.status == PROBE_STATUS)
    assert torch.equal(c.params, base.params)  # the probes' updates never entered the model
    assert c.version == base.version == 50


@pytest.mark.parametrize("tamper", ["labels", "codec"])
def test_a_tampered_probe_is_flagged_in_its_first_round_and_stays_out_of_the_model(monkeypatch, tamper):
    monkeypatch.setenv(TAMPER_ENV, tamper)
    c, s = _run(1, 2)
    monkeypatch.delenv(TAMPER_ENV)
    base, _ = _run(1, 0)
    (r,) = s.records
    (alert,) = _probe_alerts(r)
    assert alert["severity"] == "critical" and alert["round"] == 1 and alert["clients"] == [6, 7]
    assert "off the predicted one" in alert["message"]
    info = r.extra[PROBE_CLIENTS_KEY]
    assert not info["ok"] and [f["client"] for f in info["failed"]] == [6, 7]
    assert info["max_error"] > 0.3  # halved (codec) or trained on the wrong labels: far from float noise
    assert torch.equal(c.params, base.params)


def test_a_probe_refused_by_the_validators_is_a_failure(monkeypatch):
    monkeypatch.delenv(TAMPER_ENV, raising=False)
    c, s = _run(1, 1, server={"max_update_norm": 1e-6})  # every update is refused, the probe's too
    (r,) = s.records
    assert r.status == "failed" and r.accepted == 0
    (alert,) = _probe_alerts(r)
    assert "refused on the way in" in alert["message"] and "norm" in alert["message"]


def test_probe_data_is_a_known_distribution():
    a = probe_data(3, 5, 9, num_features=8, num_classes=4, examples=64)
    b = probe_data(3, 5, 9, num_features=8, num_classes=4, examples=64)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)  # what the server draws is what the device draws
    assert not torch.equal(a.x, probe_data(3, 6, 9, 8, 4, 64).x)  # a new sample each round
    flipped = probe_data(3, 5, 9, 8, 4, 64, tamper="labels")
    assert torch.equal(flipped.x, a.x) and bool((flipped.y != a.y).all())
    with pytest.raises(ValueError, match="examples"):
        probe_data(3, 5, 9, 8, 4, 0)


@pytest.mark.parametrize("section,match", [
    ({"privacy": {"secure_aggregation": True}}, "secure_aggregation"),
    ({"compression": {"adaptive": True, "ladder": ["none", "q8"]}}, "adaptive"),
    ({"personalization": {"method": "fedper"}}, "personalization"),
])
def test_runs_whose_probes_the_server_cannot_predict_are_refused(section, match):
    with pytest.raises(ConfigError, match=f"probes.clients = 2.*{match}"):
        _config(1, 2, **section)


def test_the_tamper_hook_refuses_an_unknown_value(monkeypatch):
    monkeypatch.setenv(TAMPER_ENV, "everything")
    with pytest.raises(ConfigError, match=f"{TAMPER_ENV}='everything'.*allowed: labels, codec"):
        build_coordinator(_config(1, 1), store=False)
