"""Clustered FL over gRPC: each `fleetlearn client` holds the run's k stacked models,
picks the lowest-loss one it may pick, trains it, and sends that one tagged block."""

from __future__ import annotations

import math

import torch
from grpc_test_support import NetworkRun

from fleetlearn.compression import parse_chain
from fleetlearn.compression.blocks import HEADER_BYTES
from fleetlearn.config import load_config


def test_ifca_over_grpc_trains_the_block_each_client_picked(tmp_path):
    cfg = load_config({"seed": 0, "data": {"dataset": "digits", "clients": 4, "partition": "label_permutation", "groups": 2},
                       "client": {"local_epochs": 1, "batch_size": 16}, "model": {"hidden": [16]},
                       "server": {"rounds": 3, "cohort": 4, "deadline_s": 30.0, "clustering": "ifca", "clusters": 2},
                       "monitoring": {"detectors": []}})
    net = NetworkRun(cfg, tmp_path, clients=4)
    summary, coord, start = net.run(), net.coordinator, net.start
    assert [r.accepted for r in summary.records] == [4, 4, 4]
    # The server sees no client data over gRPC: no federated evaluation, central only.
    assert all(math.isnan(r.fed_accuracy) and not math.isnan(r.accuracy) for r in summary.records)
    block_dim = coord.params.numel() // 2
    block_bytes = HEADER_BYTES + len(parse_chain("none").encode(torch.zeros(block_dim))[0])
    picked = set()
    for r in summary.records:
        for c in r.clients:
            assert c.cluster in (0, 1) and c.uplink_bytes == block_bytes  # one tagged block goes up, not both models
            picked.add(c.cluster)
    moved = [not torch.equal(b, s) for b, s in zip(coord.params.reshape(2, -1), start.reshape(2, -1))]
    assert moved == [j in picked for j in (0, 1)]  # a model moves exactly when some client picked it


def test_each_client_sees_only_its_own_candidate_clusters():
    import json

    from fleetlearn.messages import Task
    from fleetlearn.transport.grpc import FleetServer

    entry = {"mode": "cfl", "clusters": 3, "active": 3, "blocks": 3, "candidates": {"1": [0], "2": [2], "5": [0, 1]}}
    task = Task(round=1, version=0, payload=b"", codec="none", spec={"lr": 0.1, "clustering": entry})
    for client, own in ((1, {"1": [0]}), (5, {"5": [0, 1]}), (9, None)):
        seen = json.loads(FleetServer._config_json(task, client))
        assert seen["clustering"].get("candidates") == own and seen["lr"] == 0.1
        assert {k: v for k, v in seen["clustering"].items() if k != "candidates"} == {"mode": "cfl", "clusters": 3, "active": 3, "blocks": 3}
    plain = json.loads(FleetServer._config_json(Task(1, 0, b"", "none", {"lr": 0.1}), 1))
    assert plain["lr"] == 0.1 and "clustering" not in plain
