"""Clients given several server addresses (`fleetlearn client --server A,B`): an unreachable
one fails over to the next with backoff (issue 18, item 1)."""

from __future__ import annotations

import pytest
from grpc_test_support import NetworkRun
from test_grpc_end_to_end import free_port

from fleetlearn.config import load_config
from fleetlearn.transport.grpc.client import FleetClient


def test_clients_fail_over_from_a_dead_address_to_the_live_server(tmp_path):
    cfg = load_config({"seed": 1, "data": {"dataset": "digits", "clients": 3}, "server": {"cohort": 3, "rounds": 2},
                       "model": {"hidden": [8]}, "client": {"local_epochs": 1}})
    dead = free_port()  # nothing listens there: the first address of every client's list
    net = NetworkRun(cfg, tmp_path, clients=3, dial=lambda live: f"127.0.0.1:{dead},{live}")
    summary = net.run()
    assert summary.rounds == 2
    assert all(r.rounds == [1, 2] for r in net.reports.values())  # every client trained every round
    assert all(r.retries >= 1 for r in net.reports.values())  # after failing on the dead address first


@pytest.mark.parametrize("bad", ["", ",", "127.0.0.1:1,", " , 127.0.0.1:2"])
def test_a_bad_address_list_is_refused_naming_it(bad):
    with pytest.raises(ValueError, match="server address list"):
        FleetClient(bad, "t", None, None)
