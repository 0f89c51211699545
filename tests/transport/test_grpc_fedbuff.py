"""Asynchronous buffered aggregation (FedBuff, `server.mode = "async"`) over gRPC: task
groups open side by side on the server, replies handled as they arrive, real clients."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_raw_client import RawClient
from grpc_test_support import NetworkRun, make_task

from fleetlearn.compression import parse_chain
from fleetlearn.config import load_config
from fleetlearn.engine import build_coordinator
from fleetlearn.transport.grpc import commands

FP = grpc.StatusCode.FAILED_PRECONDITION


def async_config(rounds: int, concurrency: int, buffer_size: int, clients: int = 6):
    return load_config({
        "seed": 1,
        "data": {"dataset": "digits", "clients": clients},
        "server": {"cohort": concurrency, "rounds": rounds, "mode": "async", "concurrency": concurrency, "buffer_size": buffer_size},
        "model": {"hidden": [16]},
        "client": {"local_epochs": 2, "batch_size": 16},
        "monitoring": {"detectors": []},
    })


def refused(fn, code: grpc.StatusCode, words: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    assert err.value.code() == code, (err.value.code(), err.value.details())
    assert words in err.value.details(), err.value.details()


def test_task_groups_stay_open_together_and_each_update_goes_to_its_own_group(transport, tokens, learner):
    toks = tokens.add_many(["a", "b"])
    a, b = (RawClient(transport.address, toks[n]) for n in ("a", "b"))
    try:
        for c in (a, b):
            c.register(learner.spec.digest())
            c.start_heartbeats(0.05)
        params = learner.init_params(0)
        payload = parse_chain("none").encode(params)[0]
        transport.open_group(make_task(1, 0, params, deadline_s=10.0), [a.client_id], start=0.0)
        transport.open_group(make_task(2, 1, params, deadline_s=10.0), [b.client_id], start=5.0)
        # Opening group 2 superseded nothing: each client gets its own group's task.
        assert (b.pull()[0].round, b.pull()[0].version) == (2, 1)
        assert (a.pull()[0].round, a.pull()[0].version) == (1, 0)
        b.push(2, 1, payload)
        got = transport.next_arrival(timeout_s=5)
        assert (got.group, got.reply.message.client_id, got.reply.message.base_version) == (2, b.client_id, 1)
        assert got.at >= 5.0  # on the clock the group was opened with
        # Group 2 closed (its end is queued): no reply is due, so the driver dispatches at once.
        assert not transport.arrival_due(got.at) and transport.awaiting_replies()  # group 1 is still open
        refused(lambda: b.push(2, 1, payload), FP, "already sent")
        refused(lambda: a.push(2, 1, payload), FP, "not in the cohort of round 2")
        refused(lambda: a.push(1, 1, payload), FP, "round 1 trains version 0")
        a.push(1, 0, payload)
        got = transport.next_arrival(timeout_s=5)
        assert (got.group, got.reply.message.client_id) == (1, a.client_id)
        assert transport.next_arrival(timeout_s=5) is None and not transport.awaiting_replies()
        refused(lambda: a.push(1, 0, payload), FP, "already sent")  # a replay to its closed group
        # Closing the groups (the run ended): an update still in training is refused.
        transport.open_group(make_task(3, 2, params, deadline_s=10.0), [a.client_id], start=6.0)
        assert a.pull(after_round=1)[0].round == 3
        transport.close_groups("the run finished")
        transport.clients()  # the close ran on the server loop (calls run in order)
        refused(lambda: a.push(3, 2, payload), FP, "stopped collecting")
        assert transport.refusals_total() == {"duplicate": 2, "not_selected": 1, "wrong_version": 1, "round_closed": 1}
    finally:
        a.close()
        b.close()


def test_fedbuff_stops_with_the_reason_when_no_client_connects(tmp_path):
    cfg = async_config(rounds=2, concurrency=2, buffer_size=2)
    holder = {}

    def make_transport(learner, runtime):
        holder["t"] = commands.server_transport(cfg, learner.spec, "127.0.0.1:0", tmp_path / "state", heartbeat_interval_s=1.0)
        return holder["t"]

    c = build_coordinator(cfg, store=False, transport_factory=make_transport)
    try:
        c.wait_for_clients = (2, 0.5)
        s = c.run()
        assert s.rounds == 0 and c.version == 0
        assert "waited 0.5 s for 2 connected clients before round 1, 0 connected" in s.stopped_reason
        c.stopped_reason, c.wait_for_clients = None, None  # nobody to wait for, nobody to reach
        s = c.run()
        assert s.rounds == 0 and "no client could be reached" in s.stopped_reason
    finally:
        holder["t"].close(grace_s=0.2)


@pytest.mark.slow
def test_fedbuff_over_grpc_learns_with_stale_updates(tmp_path):
    net = NetworkRun(async_config(rounds=6, concurrency=3, buffer_size=2), tmp_path, clients=4)
    _, initial = net.coordinator.evaluator.central(net.start)
    s = net.run()
    assert s.rounds == 6 and s.failed_rounds == 0 and net.coordinator.version == 6
    accepted = [x for r in s.records for x in r.clients if x.status == "accepted"]
    assert len(accepted) == 12
    # Three clients train at once and the server steps after two: the third trained on an older model.
    assert any(x.staleness >= 1 for x in accepted)
    assert all(0 <= x.staleness < r.round for r in s.records for x in r.clients if x.status == "accepted")
    assert [r.extra["staleness_max"] for r in s.records] == [max(x.staleness for x in r.clients) for r in s.records]
    assert s.best_accuracy > initial + 0.2 and s.records[-1].accuracy > initial
    assert all("refusals" in r.extra for r in s.records)  # counted per step, as per synchronous round


@pytest.mark.slow
def test_fedbuff_over_grpc_keeps_stepping_while_a_client_is_still_training(tmp_path):
    """Client 0 holds its first task until the server has stepped twice: the run only gets
    there if the fast clients' updates are aggregated, and they get new tasks, without
    waiting for it (a synchronous dispatch would wait for client 0 forever)."""
    holder: dict = {"held": []}

    def hold(task) -> None:
        end = time.monotonic() + 20
        while holder["net"].coordinator.round < 2 and time.monotonic() < end:
            time.sleep(0.02)
        holder["held"].append((task.round, holder["net"].coordinator.round >= 2))

    net = NetworkRun(async_config(rounds=3, concurrency=3, buffer_size=2), tmp_path, clients=3,
                     client_options={0: {"before_train": hold}, 1: {"max_rounds": 2}, 2: {"max_rounds": 2}},
                     stopped={1: "max_rounds", 2: "max_rounds"})
    holder["net"] = net
    s = net.run()
    assert s.rounds == 3 and s.failed_rounds == 0
    assert holder["held"][0] == (1, True), "client 0 was released by its hold's timeout, not by the server's steps"
    slow = net.reports[0].client_id
    first, second, third = s.records
    # Steps 1 and 2 came from the fast clients alone, two tasks each, back to back.
    assert slow not in {x.client_id for r in (first, second) for x in r.clients}
    assert [len(net.reports[i].rounds) for i in (1, 2)] == [2, 2]
    # The slow client's update for its first task (dispatch 1, model version 0) came after both steps.
    assert net.reports[0].rounds[0] == 1
    (held,) = [x for x in third.clients if x.client_id == slow and x.staleness >= 1]
    assert held.status == "accepted" and held.staleness == 2
