"""`fleetlearn client` trains on the threads the run's `engine.threads` gives the server and
the simulation: torch's default thread count rounds some kernels differently, and the kill -9
tests compare a run of client processes with an in-process run bit for bit."""

from __future__ import annotations

import torch

from fleetlearn.config import load_config
from fleetlearn.engine.factory import build_learner
from fleetlearn.data import load_federated
from fleetlearn.transport.grpc.commands import _process_threads


def test_a_client_process_takes_the_runs_threads():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        cfg = load_config({"data": {"dataset": "synthetic", "clients": 6}, "server": {"cohort": 3}})
        learner = build_learner(cfg, load_federated(cfg.data, cfg.seed))
        _process_threads(cfg, learner)  # "auto", a small model: one thread, as the server's run
        assert torch.get_num_threads() == 1
        _process_threads(load_config({"data": {"dataset": "synthetic", "clients": 6}, "server": {"cohort": 3},
                                      "engine": {"threads": 2}}), learner)
        assert torch.get_num_threads() == 2
        torch.set_num_threads(2)
        _process_threads(load_config({"data": {"dataset": "synthetic", "clients": 6}, "server": {"cohort": 3},
                                      "engine": {"threads": 0}}), learner)  # 0: torch's own setting, left alone
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
