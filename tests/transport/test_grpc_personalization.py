"""Personalization over gRPC: each `fleetlearn client` runs the run's personal step and
keeps its personal state; only the shared part of its delta leaves the device."""

from __future__ import annotations

import math
import threading

import torch

from fleetlearn.client.personalization import head_indices
from fleetlearn.config import load_config
from fleetlearn.engine import build_coordinator
from fleetlearn.transport.grpc import commands


def _run_over_grpc(tmp_path, personalization: dict):
    cfg = load_config({"seed": 2, "data": {"dataset": "digits", "clients": 6, "partition": "dirichlet", "alpha": 0.3},
                       "server": {"cohort": 3, "rounds": 3, "deadline_s": 30.0}, "model": {"hidden": [16]},
                       "client": {"local_epochs": 1, "batch_size": 16}, "personalization": personalization,
                       "monitoring": {"detectors": []}})
    holder = {}

    def make_transport(learner, runtime):
        holder["t"] = commands.server_transport(cfg, learner.spec, "127.0.0.1:0", tmp_path / "state", heartbeat_interval_s=1.0)
        return holder["t"]

    coord = build_coordinator(cfg, store=False, transport_factory=make_transport)
    start = coord.params.clone()
    t = holder["t"]
    try:
        toks = {i: commands.token_add(tmp_path / "state", f"phone-{i}") for i in range(3)}
        reports = {}
        threads = [threading.Thread(target=lambda i=i: reports.__setitem__(i, commands.client(
            t.address, toks[i], cfg, client_index=i, give_up_after_s=30)), daemon=True) for i in toks]
        for th in threads:
            th.start()
        coord.wait_for_clients = (3, 20.0)
        summary = coord.run()
        t.finish()
        for th in threads:
            th.join(15)
    finally:
        t.close(grace_s=0.2)
    assert {i: r.stopped for i, r in reports.items()} == {i: "finished" for i in toks}
    assert [r.accepted for r in summary.records] == [3, 3, 3]
    return coord, start, summary


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
