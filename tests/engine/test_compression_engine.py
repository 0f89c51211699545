"""Compression wired into the engine: byte accounting, error feedback state,
adaptive per-client chains, sketch-space aggregation, corrupted payloads."""

import dataclasses

import numpy as np
import pytest
import torch

import fleetlearn
from fleetlearn.compression import estimate_bytes
from fleetlearn.config import ConfigError, load_config
from fleetlearn.engine import build_coordinator

BASE = {"data": {"clients": 30}, "server": {"rounds": 3, "cohort": 10}, "client": {"local_epochs": 2}}


def conf(**compression):
    return load_config({**BASE, "compression": compression})


def test_bytes_on_the_wire_are_the_payload_sizes():
    c = build_coordinator(conf(uplink="q8"), store=False)
    rec = c.run_round()
    d = c.dim
    assert all(cr.uplink_bytes == estimate_bytes("q8", d) for cr in rec.clients)
    assert all(cr.codec == "q8" for cr in rec.clients)
    assert rec.uplink_bytes == sum(cr.uplink_bytes for cr in rec.clients)
    plain = build_coordinator(conf(), store=False).run_round()
    assert plain.uplink_bytes / rec.uplink_bytes > 3.9
    # the virtual clock charges the real sizes: smaller uploads arrive sooner
    assert rec.sim_seconds < plain.sim_seconds


def test_error_feedback_residuals_persist_per_client():
    c = build_coordinator(conf(uplink="ef | topk:0.01 | q8"), store=False)
    rec = c.run_round()
    states = c.transport.device.states
    ids = [cr.client_id for cr in rec.clients]
    assert len(states) == len(ids)
    res = states.get(ids[0])["ef.residual"]
    assert res.shape == (c.dim,) and float(res.norm()) > 0
    s = fleetlearn.run({**BASE, "server": {"rounds": 10, "cohort": 10}, "compression": {"uplink": "ef | topk:0.01 | q8"}}, store=False)
    assert s.compression_ratio > 100


def test_sketch_uplink_aggregates_in_sketch_space():
    c = build_coordinator(conf(uplink="sketch:0.05,cols=0.2"), store=False)
    rec = c.run_round()
    assert rec.status == "ok" and rec.accepted == 10
    assert np.isnan([cr.update_norm for cr in rec.clients]).all()  # the server never saw a vector
    with pytest.raises(ConfigError, match="sketch space"):
        build_coordinator(load_config({**BASE, "server": {"rounds": 1, "cohort": 10, "aggregator": "median"}, "compression": {"uplink": "sketch:0.05"}}), store=False)


def test_adaptive_compression_picks_the_least_lossy_rung_that_fits():
    cfg = load_config({**BASE, "devices": {"profile": "mixed_fleet", "spread": 1.5}, "compression": {"adaptive": True, "upload_budget_s": 0.05}})
    c = build_coordinator(cfg, store=False)
    rec = c.run_round()
    ladder = c.transport.device.adaptive.ladder
    fleet = c.transport.fleet
    used = {cr.client_id: cr.codec for cr in rec.clients}
    assert len(set(used.values())) > 1  # different clients, different rungs
    sizes = [estimate_bytes(s, c.dim) for s in ladder]
    for cid, codec in used.items():
        lv = ladder.index(codec)
        up = lambda j: fleet.latency_s[cid] + sizes[j] * 8 / (fleet.uplink_mbps[cid] * 1e6)
        if lv < len(ladder) - 1 or up(lv) <= 0.05:
            assert up(lv) <= 0.05
        assert all(up(j) > 0.05 for j in range(lv))  # every less lossy rung would not fit


def test_adaptive_policy_keys_are_checked():
    with pytest.raises(ConfigError, match="'upload_budget' needs a time budget"):
        load_config({**BASE, "compression": {"adaptive": True, "adaptive_policy": "upload_budget"}})
    with pytest.raises(ConfigError, match="upload_budget_s = 0.05 applies to adaptive_policy = 'upload_budget'"):
        load_config({**BASE, "compression": {"adaptive": True, "adaptive_policy": "pace", "upload_budget_s": 0.05}})
    with pytest.raises(ConfigError, match="adaptive_policy"):
        load_config({**BASE, "compression": {"adaptive": True, "adaptive_policy": "fastest"}})
    with pytest.raises(ConfigError, match="server.mode = 'async'"):
        load_config({**BASE, "server": {"rounds": 3, "cohort": 10, "mode": "async"}, "compression": {"adaptive": True}})
    with pytest.raises(ConfigError, match="pace_slack"):
        load_config({**BASE, "compression": {"adaptive": True, "pace_slack": -0.5}})
    # the policy in force: pace unless an upload budget is given (the keys of earlier configs keep their meaning)
    assert load_config({**BASE, "compression": {"adaptive": True}}).compression.policy == "pace"
    assert load_config({**BASE, "compression": {"adaptive": True, "upload_budget_s": 0.05}}).compression.policy == "upload_budget"


def test_pace_policy_ends_the_round_near_its_earliest_possible_end():
    slack = 0.1
    cfg = load_config({**BASE, "server": {"rounds": 3, "cohort": 10, "over_selection": 1.5}, "devices": {"profile": "mixed_fleet", "spread": 1.5},
                       "compression": {"adaptive": True, "pace_slack": slack}})
    c = build_coordinator(cfg, store=False)
    rec = c.run_round()
    policy, fleet = c.transport.device.adaptive, c.transport.fleet
    ladder, est = policy.ladder, policy.level_bytes
    replied = [cr for cr in rec.clients if cr.status in ("accepted", "late")]
    assert len(replied) == 15 and rec.accepted == 10
    assert len({cr.codec for cr in replied}) > 1  # different clients, different rungs
    ids = np.array([cr.client_id for cr in replied])
    mbps, lat = fleet.uplink_mbps[ids], fleet.latency_s[ids]
    sent = np.array([cr.uplink_bytes for cr in replied])
    levels = np.array([ladder.index(cr.codec) for cr in replied])
    # Independent reconstruction from the records: arrival = before + upload of the bytes actually sent.
    before = np.array([cr.arrival_s for cr in replied]) - (lat + sent * 8 / (mbps * 1e6))
    finish = before[:, None] + lat[:, None] + est[None, :] * 8 / (mbps[:, None] * 1e6)  # planned, per rung
    T = (1 + slack) * np.sort(finish.min(axis=1))[10 - 1]
    for i, lv in enumerate(levels):
        if lv < len(ladder) - 1:
            assert finish[i, lv] <= T * (1 + 1e-9)
        assert np.all(finish[i, :lv] > T * (1 - 1e-9))  # every less lossy rung would finish after T
    # the round ends by T (real payloads are at most the planned sizes) ...
    assert rec.sim_seconds <= T * (1 + 1e-9)
    # ... well before it would with every client sending float32
    plain = build_coordinator(load_config({**BASE, "server": {"rounds": 3, "cohort": 10, "over_selection": 1.5},
                                           "devices": {"profile": "mixed_fleet", "spread": 1.5}}), store=False).run_round()
    assert rec.sim_seconds < plain.sim_seconds


@pytest.mark.parametrize("uplink, damage", [("topk:0.1 | q8", "flip"), ("q8 | zstd", "truncate")])
def test_corrupted_compressed_payload_is_refused_and_the_round_goes_on(uplink, damage):
    c = build_coordinator(conf(uplink=uplink), store=False)
    inner = c.transport.dispatch

    def damaged(task, cohort):
        for i, reply in enumerate(inner(task, cohort)):
            if i == 0:
                p = bytearray(reply.message.payload)
                if damage == "flip":
                    p[len(p) // 2] ^= 0x5A
                else:
                    del p[len(p) // 2 :]
                reply = dataclasses.replace(reply, message=dataclasses.replace(reply.message, payload=bytes(p)))
            yield reply

    c.transport.dispatch = damaged
    rec = c.run_round()
    assert rec.rejected == 1 and rec.accepted == 9 and rec.status == "ok"
    bad = next(cr for cr in rec.clients if cr.status == "rejected")
    assert bad.reason.startswith("payload:")
