"""GrpcTransport.dispatch against real clients over 127.0.0.1."""

from __future__ import annotations

import math
import threading
import time

import grpc
import pytest
import torch
from grpc_test_support import DispatchThread, make_task, tiny_data
from grpc_raw_client import RawClient

from fleetlearn.compression import parse_chain
from fleetlearn.learners import FitConfig
from fleetlearn.messages import Dropout, Update
from fleetlearn.transport import client_seed
from fleetlearn.transport.grpc import Backoff, run_client


def test_three_clients_train_and_reply_exactly_what_the_learner_computes(transport, tokens, learner):
    names = ["c0", "c1", "c2"]
    toks = tokens.add_many(names)
    data = {tokens.client_id(n): tiny_data(i) for i, n in enumerate(names)}
    reports, errors = {}, []

    def client(name: str) -> None:
        try:
            cid = tokens.client_id(name)
            reports[name] = run_client(transport.address, toks[name], learner, data[cid], name=name,
                                       backoff=Backoff(0.05, 0.5), give_up_after_s=20)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in names]
    for t in threads:
        t.start()
    assert sorted(transport.wait_available(3, timeout_s=10)) == sorted(data)

    params = learner.init_params(0)
    uplink = parse_chain("none")
    for rnd in (1, 2):
        task = make_task(rnd, rnd - 1, params, deadline_s=10.0)
        t0 = time.monotonic()
        replies = list(transport.dispatch(task, transport.available(rnd)))
        assert time.monotonic() - t0 < 5.0  # ended when all replied, not at the deadline
        assert sorted(r.message.client_id for r in replies) == sorted(data)
        assert all(isinstance(r.message, Update) for r in replies)
        assert [r.elapsed_s for r in replies] == sorted(r.elapsed_s for r in replies)  # arrival order
        hp = task.spec.fit
        deltas = []
        for r in replies:
            u = r.message
            assert (u.round, u.base_version, u.codec, u.downlink_bytes) == (rnd, rnd - 1, "none", task.nbytes)
            # independent computation: the same learner, data and per-(round, client) seed
            expect = learner.fit(params, data[u.client_id], hp, client_seed(7, rnd, u.client_id))
            got = uplink.decode(u.payload)
            assert torch.equal(got, expect.delta)
            assert u.num_examples == data[u.client_id].num_examples
            assert u.metrics.loss_before == pytest.approx(expect.loss_before)
            deltas.append(got)
        params = params + torch.stack(deltas).mean(0)
    transport.finish()
    for t in threads:
        t.join(10)
    assert not errors
    assert {n: r.stopped for n, r in reports.items()} == {n: "finished" for n in names}
    assert all(r.rounds == [1, 2] for r in reports.values())
    assert transport.refusals_total() == {}


def test_silent_client_is_dropped_at_the_deadline_and_its_late_update_refused(transport, tokens, learner):
    toks = tokens.add_many(["worker", "silent"])
    worker_done = threading.Event()
    w = threading.Thread(
        target=lambda: (run_client(transport.address, toks["worker"], learner, tiny_data(1), max_rounds=1, backoff=Backoff(0.05, 0.5)), worker_done.set()),
        daemon=True,
    )
    w.start()
    silent = RawClient(transport.address, toks["silent"])
    silent.register(learner.spec.digest())
    silent.start_heartbeats(0.05)  # alive, but never replies
    transport.wait_available(2, timeout_s=10)

    params = learner.init_params(0)
    task = make_task(1, 0, params, deadline_s=1.0)
    t0 = time.monotonic()
    replies = list(transport.dispatch(task, transport.available(1)))
    took = time.monotonic() - t0
    assert 1.0 <= took < 2.0
    by_id = {r.message.client_id: r for r in replies}
    assert isinstance(by_id[tokens.client_id("worker")].message, Update)
    drop = by_id[silent.client_id]
    assert isinstance(drop.message, Dropout) and "deadline" in drop.message.reason and drop.elapsed_s >= 1.0
    assert drop.message.downlink_bytes == 0  # it never pulled the task

    with pytest.raises(grpc.RpcError) as err:  # the round is over: nothing to pull
        silent.pull(wait_s=0.2)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "poll again" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        silent.push(1, 0, parse_chain("none").encode(params)[0])
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "deadline" in err.value.details()
    assert transport.refusals_total() == {"after_deadline": 1}
    assert worker_done.wait(5)
    silent.close()


def test_client_that_stops_heartbeating_is_dropped_before_the_deadline(transport, tokens, learner):
    tok = tokens.add("flaky")
    c = RawClient(transport.address, tok)
    c.register(learner.spec.digest())
    c.start_heartbeats(0.05)
    assert transport.wait_available(1, timeout_s=5) == [c.client_id]
    d = DispatchThread(transport, make_task(1, 0, learner.init_params(0), deadline_s=10.0), [c.client_id])
    meta, payload, _ = c.pull()
    assert meta.round == 1
    c.stop_heartbeats()  # vanishes mid-round
    t0 = time.monotonic()
    (reply,) = d.join(timeout=5)
    assert time.monotonic() - t0 < 2.0  # heartbeat timeout is 0.6 s here, far below the 10 s deadline
    assert isinstance(reply.message, Dropout) and "no heartbeat" in reply.message.reason
    assert reply.message.downlink_bytes == len(payload)
    assert list(transport.available(2)) == []
    c.close()


def test_unconnected_cohort_member_is_dropped_at_once(transport, tokens, learner):
    tokens.add("never-connected")
    cid = tokens.client_id("never-connected")
    t0 = time.monotonic()
    (reply,) = list(transport.dispatch(make_task(1, 0, learner.init_params(0), deadline_s=5.0), [cid]))
    assert time.monotonic() - t0 < 1.0
    assert isinstance(reply.message, Dropout) and "not connected" in reply.message.reason


def test_no_deadline_still_ends_at_max_round_s(tokens, learner):
    from fleetlearn.transport.grpc import GrpcTransport

    with GrpcTransport(tokens=tokens, spec=learner.spec, heartbeat_interval_s=0.1, max_round_s=0.5) as t:
        tok = tokens.add("lazy")
        c = RawClient(t.address, tok)
        c.register(learner.spec.digest())
        c.start_heartbeats(0.05)
        t0 = time.monotonic()
        (reply,) = list(t.dispatch(make_task(1, 0, learner.init_params(0), deadline_s=None), [c.client_id]))
        assert 0.5 <= time.monotonic() - t0 < 1.5
        assert isinstance(reply.message, Dropout)
        c.close()


def test_coordinator_stopping_early_closes_the_round(transport, tokens, learner):
    toks = tokens.add_many(["a", "b"])
    clients = [RawClient(transport.address, toks[n]) for n in ("a", "b")]
    for c in clients:
        c.register(learner.spec.digest())
        c.start_heartbeats(0.05)
    params = learner.init_params(0)
    payload = parse_chain("none").encode(params)[0]
    gen = transport.dispatch(make_task(1, 0, params, deadline_s=10.0), [c.client_id for c in clients])
    pushed = threading.Thread(target=lambda: (time.sleep(0.2), clients[0].pull(), clients[0].push(1, 0, payload)), daemon=True)
    pushed.start()
    first = next(gen)  # a quorum of one, say
    assert first.message.client_id == clients[0].client_id
    gen.close()
    time.sleep(0.1)
    with pytest.raises(grpc.RpcError) as err:
        clients[1].push(1, 0, payload)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "stopped collecting" in err.value.details()
    assert transport.refusals_total() == {"round_closed": 1}
    for c in clients:
        c.close()


def test_update_metrics_survive_nan_accuracy(transport, tokens, learner):
    """A client without a local test split reports accuracy nan; that is not malformed."""
    tok = tokens.add("no-test")
    c = RawClient(transport.address, tok)
    c.register(learner.spec.digest())
    c.start_heartbeats(0.05)
    params = learner.init_params(0)
    d = DispatchThread(transport, make_task(1, 0, params), [c.client_id])
    c.pull()
    from fleetlearn.transport.grpc import fleetlearn_pb2 as pb

    payload = parse_chain("none").encode(params)[0]
    c.push(1, 0, payload, metrics=pb.ClientMetrics(loss_before=1, loss_after=1, accuracy=math.nan, steps=1, samples=4))
    (reply,) = d.join()
    assert math.isnan(reply.message.metrics.accuracy)
    c.close()
