"""Personalization over gRPC: each `fleetlearn client` runs the run's personal step and
keeps its personal state; only the shared part of its delta leaves the device."""

from __future__ import annotations

import math

import torch
from grpc_test_support import NetworkRun

from fleetlearn.client.personalization import head_indices
from fleetlearn.config import load_config


def _run_over_grpc(tmp_path, personalization: dict):
    cfg = load_config({"seed": 2, "data": {"dataset": "digits", "clients": 6, "partition": "dirichlet", "alpha": 0.3},
                       "server": {"cohort": 3, "rounds": 3, "deadline_s": 30.0}, "model": {"hidden": [16]},
                       "client": {"local_epochs": 1, "batch_size": 16}, "personalization": personalization,
                       "monitoring": {"detectors": []}})
    net = NetworkRun(cfg, tmp_path, clients=3)
    summary = net.run()
    assert [r.accepted for r in summary.records] == [3, 3, 3]
    return net.coordinator, net.start, summary


def test_fedper_heads_stay_on_the_devices(tmp_path):
    coord, start, summary = _run_over_grpc(tmp_path, {"method": "fedper"})
    head = head_indices(coord.learner.spec, "last")
    assert torch.equal(coord.params[head], start[head])  # no head delta ever reached the server
    body = torch.ones(coord.params.numel(), dtype=torch.bool)
    body[head] = False
    assert not torch.equal(coord.params[body], start[body])
    for r in summary.records:
        assert all(0.0 <= c.personal_accuracy <= 1.0 and 0.0 <= c.global_accuracy <= 1.0 for c in r.clients)
    # The summary reports what the last round's clients measured (the server has no client data).
    last = summary.records[-1]
    assert summary.personal_accuracy == last.personal_accuracy and not math.isnan(summary.personal_gain)


def test_finetune_reports_personal_accuracy(tmp_path):
    _, _, summary = _run_over_grpc(tmp_path, {"method": "finetune", "finetune_steps": 5})
    assert all(not math.isnan(r.personal_accuracy) for r in summary.records)
    assert 0.0 <= summary.personal_accuracy <= 1.0
