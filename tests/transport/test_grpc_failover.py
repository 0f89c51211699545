"""Clients given several server addresses (`fleetlearn client --server A,B`): an unreachable
one fails over to the next with backoff (issue 18, item 1)."""

from __future__ import annotations

import pytest
from grpc_test_support import NetworkRun, tiny_data
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


def test_a_waiting_standby_answers_retry_after_and_the_client_comes_back_without_backing_off():
    import asyncio

    import grpc

    from fleetlearn.transport.grpc import fleetlearn_pb2 as pb
    from fleetlearn.transport.grpc import fleetlearn_pb2_grpc as pb_grpc
    from fleetlearn.transport.grpc.client import Backoff
    from fleetlearn.transport.grpc.server import RETRY_AFTER_HEADER
    from fleetlearn.transport.grpc.standby import StandbyEndpoint

    port = free_port()
    standby = StandbyEndpoint(f"127.0.0.1:{port}", None, 0.05, "standby for run R: not leading yet").start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:  # every method, whatever its streaming kind
            stub = pb_grpc.FleetLearnStub(ch)
            for call in (lambda: stub.Register(pb.RegisterRequest()), lambda: list(stub.PullTask(pb.PullTaskRequest()))):
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "not leading yet" in err.value.details()
                assert (RETRY_AFTER_HEADER, "50") in tuple(err.value.trailing_metadata())
        # A client whose only address is the standby retries after the hint, not after its
        # 3 s backoff: many tries before it gives up at 1.5 s.
        from fleetlearn.learners import TorchLearner, mlp

        client = FleetClient(f"127.0.0.1:{port}", "t", TorchLearner(lambda: mlp(4, 3, [8]), vectorize=False), tiny_data(0), backoff=Backoff(initial_s=3.0, max_s=3.0, jitter=0.0),
                             give_up_after_s=1.5)
        report = asyncio.run(client.run())
        assert report.stopped.startswith("gave_up") and report.retries >= 4, (report.stopped, report.retries)
    finally:
        standby.stop()
