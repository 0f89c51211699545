"""SCAFFOLD over gRPC: the task streams the server control variate c after the model;
each client corrects its gradients by c - c_i and keeps its own c_i across rounds."""

from __future__ import annotations

import threading

import grpc
import pytest
import torch
from grpc_raw_client import RawClient
from grpc_test_support import ClientThreads, NetworkRun, make_task, tiny_data

from fleetlearn.compression import CodecChain, parse_chain
from fleetlearn.config import load_config
from fleetlearn.learners import FitConfig
from fleetlearn.learners.scaffold import control_deltas
from fleetlearn.messages import Task, Update
from fleetlearn.transport import client_seed
from fleetlearn.transport.grpc import Backoff, FleetServer, GrpcTransport, commands, run_client
from fleetlearn.transport.grpc.local_data import client_from_config

HP = {"lr": 0.1, "local_epochs": 2, "batch_size": 4, "seed": 7, "momentum": 0.5}


def _task(round: int, params: torch.Tensor, c: torch.Tensor) -> Task:
    return Task(round=round, version=round - 1, payload=parse_chain("none").encode(params)[0], codec="none", spec=dict(HP),
                deadline_s=10.0, control=CodecChain().encode(c)[0])


def test_clients_train_with_the_tasks_control_variate_and_keep_their_own(tokens, learner):
    t = GrpcTransport("127.0.0.1:0", tokens=tokens, spec=learner.spec, features=("scaffold",), heartbeat_interval_s=1.0, max_round_s=20.0)
    try:
        toks = tokens.add_many(["a", "b"])
        data = {tokens.client_id(n): tiny_data(i) for i, n in enumerate(toks)}
        clients = ClientThreads(t.address, toks, tokens, learner, data)
        assert sorted(t.wait_available(2, timeout_s=10)) == sorted(data)
        g = torch.Generator().manual_seed(0)
        params = learner.init_params(0)
        c_i = {cid: torch.zeros(params.numel()) for cid in data}  # what each device should hold
        hp = FitConfig.from_dict(HP)
        for rnd in (1, 2):
            c = 0.05 * torch.randn(params.numel(), generator=g)
            task = _task(rnd, params, c)
            replies = list(t.dispatch(task, sorted(data)))
            assert sorted(r.message.client_id for r in replies) == sorted(data)
            deltas = []
            for r in replies:
                u = r.message
                assert isinstance(u, Update) and u.downlink_bytes == task.nbytes == len(task.payload) + len(task.control)
                expect = learner.fit(params, data[u.client_id], hp, client_seed(7, rnd, u.client_id), correction=c - c_i[u.client_id])
                got = parse_chain("none").decode(u.payload)
                assert torch.equal(got, expect.delta)
                plain = learner.fit(params, data[u.client_id], hp, client_seed(7, rnd, u.client_id))
                assert not torch.allclose(got, plain.delta)  # the correction changed the training
                c_i[u.client_id] = c_i[u.client_id] + control_deltas(expect.delta[None], [expect.steps], hp.lr, hp.momentum, c)[0]
                deltas.append(got)
            params = params + torch.stack(deltas).mean(0)
        t.finish()
        clients.join()
        assert t.refusals_total() == {}
    finally:
        t.close(grace_s=0.2)


def test_a_client_without_the_scaffold_feature_is_refused(tokens, learner):
    t = GrpcTransport("127.0.0.1:0", tokens=tokens, spec=learner.spec, features=("scaffold",), heartbeat_interval_s=1.0)
    c = RawClient(t.address, tokens.add("old"))
    try:
        with pytest.raises(grpc.RpcError) as err:
            c.register(learner.spec.digest())
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "lacks protocol feature(s) scaffold" in err.value.details()
    finally:
        c.close()
        t.close(grace_s=0.2)


def test_fleetlearn_server_accepts_scaffold_and_asks_clients_for_it(tmp_path):
    cfg = load_config({"data": {"dataset": "digits", "clients": 10}, "server": {"cohort": 2}, "model": {"hidden": [16]},
                       "client": {"objective": "scaffold"}})
    learner, _ = client_from_config(cfg, client_index=0)
    t = commands.server_transport(cfg, learner.spec, "127.0.0.1:0", tmp_path / "state")
    try:
        assert t.requirements.features == ("scaffold",)
    finally:
        t.close(grace_s=0.2)


def test_a_scaffold_run_over_grpc_updates_the_server_control_variate(tmp_path):
    from fleetlearn.learners.scaffold import SERVER_KEY

    cfg = load_config({"seed": 1, "data": {"dataset": "digits", "clients": 6, "partition": "dirichlet", "alpha": 0.3},
                       "server": {"cohort": 3, "rounds": 3, "deadline_s": 30.0}, "model": {"hidden": [16]},
                       "client": {"objective": "scaffold", "local_epochs": 1, "batch_size": 16}, "monitoring": {"detectors": []}})
    net = NetworkRun(cfg, tmp_path, clients=3)
    summary, coord = net.run(), net.coordinator
    assert [r.accepted for r in summary.records] == [3, 3, 3] and summary.failed_rounds == 0
    c = coord.server_state[SERVER_KEY]
    assert torch.isfinite(c).all() and c.abs().sum() > 0  # moved from 0 by the clients' deltas
    # The downlink carries c as well as the model: twice the float32 model per client.
    assert all(r.downlink_bytes == 3 * 2 * (len(parse_chain("none").encode(coord.params)[0])) for r in summary.records)


def test_a_task_the_client_cannot_use_is_skipped_and_the_client_carries_on(tokens, learner):
    t = GrpcTransport("127.0.0.1:0", tokens=tokens, spec=learner.spec, features=("scaffold",), heartbeat_interval_s=0.5, max_round_s=20.0)
    try:
        tok = tokens.add("a")
        cid = tokens.client_id("a")
        reports = {}
        th = threading.Thread(target=lambda: reports.__setitem__("a", run_client(
            t.address, tok, learner, tiny_data(0), name="a", backoff=Backoff(0.05, 0.5), give_up_after_s=20)), daemon=True)
        th.start()
        assert t.wait_available(1, timeout_s=10) == [cid]
        params = learner.init_params(0)
        bad = _task(1, params, torch.zeros(params.numel() + 1))  # c of the wrong size
        bad = Task(bad.round, bad.version, bad.payload, bad.codec, bad.spec, deadline_s=1.5, control=bad.control)
        (reply,) = list(t.dispatch(bad, [cid]))
        assert not isinstance(reply.message, Update)  # nothing came back before the deadline
        (reply,) = list(t.dispatch(_task(2, params, torch.zeros(params.numel())), [cid]))
        assert isinstance(reply.message, Update) and reply.message.round == 2
        t.finish()
        th.join(10)
        assert reports["a"].skipped_bad_task == 1 and reports["a"].stopped == "finished"
    finally:
        t.close(grace_s=0.2)


@pytest.mark.parametrize("wire", ['{"lr": NaN}', '{"lr": 0.1, "teleport": {}}', '{"lr": 0.1, "local_dp": {"clip_norm": -1}}', "[]"])
def test_a_task_spec_the_client_cannot_parse_is_skipped_and_the_client_carries_on(tokens, learner, monkeypatch, wire):
    """A server (or a proxy) that sends a malformed task spec costs the client that round only."""
    real = FleetServer._config_json
    monkeypatch.setattr(FleetServer, "_config_json", staticmethod(lambda task, client: wire if task.round == 1 else real(task, client)))
    t = GrpcTransport("127.0.0.1:0", tokens=tokens, spec=learner.spec, heartbeat_interval_s=0.5, max_round_s=20.0)
    try:
        tok = tokens.add("a")
        cid = tokens.client_id("a")
        reports = {}
        th = threading.Thread(target=lambda: reports.__setitem__("a", run_client(
            t.address, tok, learner, tiny_data(0), name="a", backoff=Backoff(0.05, 0.5), give_up_after_s=20)), daemon=True)
        th.start()
        assert t.wait_available(1, timeout_s=10) == [cid]
        params = learner.init_params(0)
        (reply,) = list(t.dispatch(make_task(1, 0, params, deadline_s=1.5), [cid]))
        assert not isinstance(reply.message, Update)
        (reply,) = list(t.dispatch(make_task(2, 0, params, deadline_s=10.0), [cid]))
        assert isinstance(reply.message, Update) and reply.message.round == 2
        t.finish()
        th.join(10)
        assert reports["a"].skipped_bad_task == 1 and reports["a"].stopped == "finished"
    finally:
        t.close(grace_s=0.2)
