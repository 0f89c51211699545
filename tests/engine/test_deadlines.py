"""Deadlines, over-selection, min_replies, dropout, availability and partial work."""

import math

import numpy as np
import torch

from fleetlearn.config import load_config
from fleetlearn.devices import make_fleet
from fleetlearn.engine import build_coordinator


def cfg(server=None, devices=None, rounds=3, epochs=1):
    return load_config({
        "data": {"clients": 30},
        "server": {"rounds": rounds, "cohort": 10, **(server or {})},
        "client": {"local_epochs": epochs},
        "devices": devices or {},
    })


def test_a_round_where_everyone_drops_ends_at_its_deadline_and_the_run_goes_on():
    c = build_coordinator(cfg({"deadline_s": 5.0}, {"dropout": 1.0}), store=False)
    before = c.params.clone()
    rec = c.run_round()
    assert rec.status == "failed" and rec.dropped == 10 and rec.accepted == 0
    assert rec.sim_seconds == 5.0 and c.clock.now == 5.0
    assert torch.equal(c.params, before) and c.version == 0
    assert all(cr.reason.startswith("dropout:") for cr in rec.clients)
    assert c.run_round().round == 2


def test_without_a_deadline_dropouts_do_not_hang_the_round():
    c = build_coordinator(cfg(devices={"dropout": 1.0}), store=False)
    rec = c.run_round()
    assert rec.status == "failed" and math.isfinite(rec.sim_seconds)


def test_late_replies_are_refused_with_a_reason_and_counted():
    c = build_coordinator(cfg({"deadline_s": 1.0}, {"slow_fraction": 0.5, "slow_factor": 50.0}), store=False)
    rec = c.run_round()
    late = [cr for cr in rec.clients if cr.status == "late"]
    assert rec.late == len(late) > 0 and rec.accepted == 10 - rec.late
    assert all("deadline 1.000s" in cr.reason and cr.arrival_s > 1.0 for cr in late)
    assert rec.sim_seconds == 1.0
    assert all(cr.weight == 0 for cr in late)


def test_over_selection_keeps_the_first_cohort_replies():
    c = build_coordinator(cfg({"over_selection": 1.5}, {"profile": "mixed_fleet"}), store=False)
    rec = c.run_round()
    assert rec.selected == 15 and rec.accepted == 10 and rec.late == 5
    accepted = sorted(cr.arrival_s for cr in rec.clients if cr.status == "accepted")
    late = [cr for cr in rec.clients if cr.status == "late"]
    assert all(cr.reason.startswith("not needed") and cr.arrival_s >= accepted[-1] for cr in late)
    assert rec.sim_seconds == accepted[-1]


def test_min_replies_fails_the_round_and_keeps_the_model():
    c = build_coordinator(cfg({"deadline_s": 1.0, "min_replies": 8}, {"slow_fraction": 0.6, "slow_factor": 50.0}), store=False)
    before = c.params.clone()
    rec = c.run_round()
    assert rec.accepted < 8 and rec.status == "failed" and "min_replies = 8" in rec.reason
    assert torch.equal(c.params, before)


def test_adaptive_deadline_follows_recent_completion_times():
    c = build_coordinator(cfg({"deadline_policy": "adaptive", "deadline_quantile": 0.5}, {"profile": "mixed_fleet"}), store=False)
    r1 = c.run_round()
    assert math.isnan(r1.deadline_s)  # no history and no initial deadline: wait for all
    arrivals = [cr.arrival_s for cr in r1.clients]
    r2 = c.run_round()
    assert math.isclose(r2.deadline_s, float(np.quantile(arrivals, 0.5)))
    assert r2.late > 0


def test_partial_work_lets_slow_clients_report_in_time_with_fewer_steps():
    common = {"deadline_s": 1.0}
    dev = {"slow_fraction": 0.5, "slow_factor": 10.0}
    without = build_coordinator(cfg(common, dev, epochs=10), store=False).run_round()
    assert without.late > 0
    c = build_coordinator(cfg({**common, "partial_work": True}, dev, epochs=10), store=False)
    rec = c.run_round()
    assert rec.accepted > without.accepted
    full_steps = max(cr.steps for cr in rec.clients)
    partial = [cr for cr in rec.clients if cr.status == "accepted" and cr.steps < full_steps]
    assert partial and all(cr.arrival_s <= 1.0 for cr in rec.clients if cr.status == "accepted")


def test_flaky_preset_has_dropouts_and_diurnal_availability():
    conf = cfg(devices={"profile": "flaky", "day_s": 100.0}, rounds=6)
    fleet = make_fleet(conf.devices, 1000, 0)
    assert np.allclose(fleet.dropout, 0.3)
    on = fleet.online(np.arange(1000), 0.0).mean()
    assert 0.5 < on < 0.9
    later = fleet.online(np.arange(1000), 50.0)
    assert (later != fleet.online(np.arange(1000), 0.0)).any()
    c = build_coordinator(conf, store=False)
    dropped = sum(c.run_round().dropped for _ in range(6))
    assert dropped > 0
    assert len(c.transport.available(7)) < 30
