"""Adaptive compression over gRPC: the server measures each client's uplink from the
updates it receives and names each client's rung of the ladder in its task; an update
in another rung is refused."""

from __future__ import annotations

import threading

import grpc
import pytest
import torch
from grpc_raw_client import RawClient
from grpc_test_support import DispatchThread, tiny_data

from fleetlearn.compression import parse_chain
from fleetlearn.learners import TorchLearner, mlp
from fleetlearn.messages import Task, Update
from fleetlearn.transport.grpc import Backoff, GrpcTransport, RunRequirements, run_client

LADDER = ["none", "q8", "q4", "topk:0.05 | q8"]


def make_learner() -> TorchLearner:
    # 4 -> 256 -> 3: 2,051 parameters, an 8.2 KB float32 update (large enough to time).
    return TorchLearner(lambda: mlp(4, 3, [256]), vectorize=False)


@pytest.fixture
def wide_learner() -> TorchLearner:
    return make_learner()


def _task(round: int, params: torch.Tensor, **adaptive) -> Task:
    payload, _ = parse_chain("none").encode(params)
    hp = {"lr": 0.1, "local_epochs": 1, "batch_size": 6, "seed": 7, "adaptive": {"policy": "upload_budget", **adaptive}}
    return Task(round=round, version=round - 1, payload=payload, codec="none", spec=hp, deadline_s=20.0)


def test_server_measures_uplinks_and_gives_slow_links_a_lossier_rung(tokens, wide_learner):
    t = GrpcTransport("127.0.0.1:0", tokens=tokens, spec=wide_learner.spec, ladder=LADDER, heartbeat_interval_s=1.0, max_round_s=30.0)
    try:
        toks = tokens.add_many(["fast", "slow"])
        fast, slow = tokens.client_id("fast"), tokens.client_id("slow")
        limits = {"fast": None, "slow": 0.2}  # the slow device sends at most 0.2 Mbit/s: ~0.33 s for 8.2 KB
        errors: list[BaseException] = []

        def client(name: str) -> None:
            try:
                # each device its own learner, as separate processes would have
                run_client(t.address, toks[name], make_learner(), tiny_data(len(name)), name=name, backoff=Backoff(0.05, 0.5),
                           give_up_after_s=20, uplink_limit_mbps=limits[name])
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in limits]
        for th in threads:
            th.start()
        assert sorted(t.wait_available(2, timeout_s=10)) == sorted([fast, slow])
        params = wide_learner.init_params(0)
        codecs = []
        for rnd in (1, 2, 3):
            # Upload budget 0.1 s: float32 fits a loopback link, not 0.2 Mbit/s (0.33 s).
            replies = list(t.dispatch(_task(rnd, params, upload_budget_s=0.1), [fast, slow]))
            assert all(isinstance(r.message, Update) for r in replies) and len(replies) == 2, ([r.message for r in replies], errors)
            by = {r.message.client_id: r.message for r in replies}
            codecs.append({c: by[c].codec for c in by})
            for u in by.values():
                delta = parse_chain(u.codec).decode(u.payload, dim=params.numel())
                assert delta.shape == params.shape and torch.isfinite(delta).all() and delta.abs().sum() > 0
            assert by[slow].extra["uplink_mbps"] < 0.4  # measured on the wire, not announced
            assert by[fast].extra["uplink_mbps"] > by[slow].extra["uplink_mbps"]
        # Round 1: nothing measured yet, so both start on the least lossy rung.
        assert codecs[0] == {fast: "none", slow: "none"}
        # Then the measured 0.2 Mbit/s link needs a payload of at most ~2.5 KB to upload in 0.1 s.
        for c in codecs[1:]:
            assert c[fast] == "none" and c[slow] != "none"
            bound = RunRequirements.for_run(wide_learner.spec, ladder=LADDER).rung_bytes[LADDER.index(c[slow])][1]
            assert bound * 8 / 0.2e6 <= 0.1
        link = {c["client_id"]: c["link"] for c in t.clients()}
        assert link[slow]["updates"] == 3 and 0.1 < link[slow]["uplink_mbps"] < 0.4
        t.finish()
        for th in threads:
            th.join(10)
        assert not errors
    finally:
        t.close(grace_s=0.2)


def test_an_update_in_another_rung_than_assigned_is_refused(tokens, wide_learner):
    t = GrpcTransport("127.0.0.1:0", tokens=tokens, spec=wide_learner.spec, ladder=LADDER, heartbeat_interval_s=1.0, max_round_s=30.0)
    c = RawClient(t.address, tokens.add("raw"))
    try:
        c.register(wide_learner.spec.digest(), codecs=("none", "q8", "q4", "topk"))
        c.start_heartbeats()
        params = wide_learner.init_params(0)
        d = DispatchThread(t, _task(1, params, upload_budget_s=5.0), [c.client_id])
        meta, _, _ = c.pull()
        assert meta.uplink_codec == "none"  # unmeasured: the least lossy rung
        q4, _ = parse_chain("q4").encode(torch.zeros(params.numel()))
        with pytest.raises(grpc.RpcError) as err:
            c.push(1, 0, q4, codec="q4")
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "rung 'none'" in err.value.details()
        ok, _ = parse_chain("none").encode(torch.zeros(params.numel()))
        assert c.push(1, 0, ok, codec="none").accepted
        assert [type(r.message) for r in d.join()] == [Update]
        assert t.refusals_total() == {"wrong_codec": 1}
    finally:
        c.stop_heartbeats()
        c.close()
        t.close(grace_s=0.2)


def test_a_client_lacking_a_rungs_codec_is_refused_at_registration(tokens, wide_learner):
    t = GrpcTransport("127.0.0.1:0", tokens=tokens, spec=wide_learner.spec, ladder=LADDER, heartbeat_interval_s=0.2)
    c = RawClient(t.address, tokens.add("old"))
    try:
        with pytest.raises(grpc.RpcError) as err:
            c.register(wide_learner.spec.digest(), codecs=("none", "q8"))
        assert "lacks codec(s) q4, topk" in err.value.details() and "adaptive ladder" in err.value.details()
    finally:
        c.close()
        t.close(grace_s=0.2)


def test_uplink_limit_must_be_positive(wide_learner):
    from fleetlearn.transport.grpc.client import FleetClient

    with pytest.raises(ValueError, match="uplink_limit_mbps"):
        FleetClient("127.0.0.1:1", "t", wide_learner, tiny_data(0), uplink_limit_mbps=0.0)
