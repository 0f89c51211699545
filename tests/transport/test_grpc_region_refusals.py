"""Regional aggregators: what a root and an aggregator refuse (engine.region_aggregators).

Bad config combinations are ConfigErrors naming the key; at the root, a plain client, an
unknown region, a second aggregator for a live region, a wrong token, a forward for another
region, a wrong-shaped or replayed forward are refused with their status codes; a NaN sum
is rejected by the root's intake with the reason in the round record while the other
region's sum is applied; an aggregator refuses the clients of other regions."""

from __future__ import annotations

import math
import threading

import grpc
import numpy as np
import pytest
import torch
from grpc_raw_client import RawClient

from fleetlearn.config import ConfigError, load_config
from fleetlearn.engine import build_coordinator
from fleetlearn.engine.aggregator import build_aggregator
from fleetlearn.engine.hierarchy import regional_mean
from fleetlearn.engine.regions import (REGION_FEATURE, REGION_SUM_CODEC, RegionMembership, RegionSumStage, pack_region_sum,
                                       region_sum_bytes)
from fleetlearn.aggregation.pipeline import Batch
from fleetlearn.transport.grpc import GrpcTransport, TokenStore, runtime_version
from fleetlearn.transport.grpc import commands
from fleetlearn.transport.grpc import fleetlearn_pb2 as pb

FP, IA = grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT
PD, UA = grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED


def config(**over):
    base = {"seed": 1, "data": {"dataset": "digits", "clients": 4, "partition": "iid"},
            "server": {"rounds": 2, "cohort": 4}, "engine": {"regions": 2, "region_aggregators": True},
            "monitoring": {"detectors": []}}
    for key, value in over.items():
        section, name = key.split("__")
        base.setdefault(section, {})[name] = value
    return load_config(base)


def refused(fn, code, words: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    assert err.value.code() == code, (err.value.code(), err.value.details())
    assert words in err.value.details(), err.value.details()


def root_coordinator(cfg, state):
    holder = {}

    def make_transport(learner, device):
        holder["t"] = commands.server_transport(cfg, learner.spec, "127.0.0.1:0", state, heartbeat_interval_s=0.2, learner=learner)
        return holder["t"]

    try:
        return build_coordinator(cfg, store=False, transport_factory=make_transport), holder["t"]
    except BaseException:
        if "t" in holder:
            holder["t"].close(grace_s=0.1)
        raise


def test_config_combinations_a_root_of_regional_aggregators_cannot_serve(tmp_path):
    with pytest.raises(ConfigError, match="min_regions = 3 exceeds engine.regions = 2"):
        config(engine__min_regions=3)
    with pytest.raises(ConfigError, match="region_failure"):
        config(engine__region_failure=0.1)
    with pytest.raises(ConfigError, match="fleetlearn server"):
        build_coordinator(config(), store=False)  # the simulation has no aggregator processes
    for over, words in ((dict(server__aggregator="median"), "does not decompose"),
                        (dict(privacy__mode="central", privacy__noise_multiplier=1.0, privacy__clip_norm=1.0), "not built"),
                        (dict(server__mode="async"), "FedBuff"),
                        (dict(client__objective="scaffold"), "scaffold"),
                        (dict(server__cohort=1, server__min_replies=1), "server.cohort = 1")):
        try:
            cfg = config(**over)
        except ConfigError as exc:  # refused by the config itself: fine too, if it names the key
            assert words.split()[0] in str(exc), exc
            continue
        with pytest.raises(ConfigError, match="engine.region_aggregators = true") as err:
            root_coordinator(cfg, tmp_path / "state")
        assert words in str(err.value), err.value
    with pytest.raises(ConfigError, match="engine.region_aggregators = false"):
        build_aggregator(config(engine__region_aggregators=False), 0, address="127.0.0.1:0", state_dir=tmp_path / "s")
    with pytest.raises(ValueError, match="region 2 does not exist"):
        build_aggregator(config(), 2, address="127.0.0.1:0", state_dir=tmp_path / "s")


def register(rc: RawClient, digest: str, region: int | None = None) -> pb.RegisterReply:
    req = pb.RegisterRequest(client_name="raw", runtime_version=runtime_version(),
                             capabilities=pb.Capabilities(codecs=["none"], model_widths=[1.0], model_digest=digest,
                                                          features=[REGION_FEATURE] if region is not None else []))
    if region is not None:
        req.region = region
    reply = rc.stub.Register(req, metadata=rc.metadata, timeout=10)
    rc.client_id, rc.session = reply.client_id, reply.session
    return reply


def forward(rc: RawClient, round: int, version: int, payload: bytes, region: int, weight: float, **over) -> pb.PushReply:
    meta = dict(region=pb.RegionSum(region=region, weight=weight, clients=2, selected=2, client_uplink_bytes=100, client_downlink_bytes=200))
    meta.update(over)
    return rc.push(round, version, payload, codec=REGION_SUM_CODEC, num_examples=10, **meta)


def test_the_root_refuses_bad_aggregators_and_rejects_a_nan_sum_with_its_reason(tmp_path):
    cfg = config()
    coordinator, transport = root_coordinator(cfg, tmp_path / "state")
    digest = coordinator.learner.spec.digest()
    dim = coordinator.dim
    start = coordinator.params.clone()
    with TokenStore.open(tmp_path / "state") as store:
        toks = store.add_many(["eu", "us", "eu-2", "client"])
    eu, us, eu2, plain = (RawClient(transport.address, toks[n]) for n in ("eu", "us", "eu-2", "client"))
    clients = [eu, us, eu2, plain]
    done = {}
    try:
        refused(lambda: register(plain, digest), FP, "not clients")
        refused(lambda: register(eu2, digest, region=7), FP, "region 7 does not exist")
        refused(lambda: register(RawClient(transport.address, "nope"), digest, region=0), UA, "unknown token")
        register(eu, digest, region=0)
        register(us, digest, region=1)
        for c in (eu, us):
            c.start_heartbeats(0.05)
        refused(lambda: register(eu2, digest, region=0), PD, "region 0 is served by aggregator")
        coordinator.wait_for_clients = (2, 20.0)
        runner = threading.Thread(target=lambda: done.setdefault("summary", coordinator.run()), daemon=True)
        runner.start()

        rng = np.random.default_rng(0)
        good = torch.from_numpy(rng.normal(size=dim) * 0.01)
        for c in (eu, us):
            meta, _, _ = c.pull(wait_s=10)
            assert meta.round == 1
        refused(lambda: forward(us, 1, 0, pack_region_sum(good, 2.0), region=0, weight=2.0), PD, "registered for region 1")
        refused(lambda: forward(us, 1, 0, b"\0" * (8 * dim), region=1, weight=2.0), IA, "cannot be the model's")
        refused(lambda: forward(us, 1, 0, pack_region_sum(good, 2.0), region=1, weight=math.nan), IA, "region.weight")
        forward(eu, 1, 0, pack_region_sum(good * 3.0, 3.0), region=0, weight=3.0)
        nan = good.clone()
        nan[5] = math.nan
        forward(us, 1, 0, pack_region_sum(nan, 2.0), region=1, weight=2.0)  # the right size: the intake judges it
        for c in (eu, us):
            meta, _, _ = c.pull(wait_s=10, after_round=1)
            assert meta.round == 2
        refused(lambda: forward(eu, 1, 0, pack_region_sum(good, 1.0), region=0, weight=1.0), FP, "is over")  # replayed round
        forward(eu, 2, 1, pack_region_sum(good, 1.0), region=0, weight=1.0)
        forward(us, 2, 1, pack_region_sum(good, 1.0), region=1, weight=1.0)
        runner.join(30)
        assert not runner.is_alive()
    finally:
        transport.finish()
        for c in clients:
            c.close()
        transport.close(grace_s=0.1)
    r1, r2 = coordinator.records
    assert r1.status == "ok" and r1.accepted == 1 and r1.rejected == 1
    rejected = next(c for c in r1.clients if c.status == "rejected")
    assert rejected.client_id == us.client_id and "non-finite" in rejected.reason
    assert r1.extra["hierarchy_failed_regions"] == [1] and "non-finite" in r1.extra["hierarchy_region_failures"]["1"]
    assert r1.extra["hierarchy_regions_reporting"] == 1 and r1.extra["hierarchy_clients"] == 4  # both regions' reports counted
    assert r2.status == "ok" and r2.extra["hierarchy_regions_reporting"] == 2
    # round 1 applied region 0's mean alone (server optimizer: SGD, lr 1), round 2 the mean of two equal sums
    expected = start + good.float() + good.float()
    assert torch.allclose(coordinator.params, expected, atol=1e-6), float((coordinator.params - expected).abs().max())
    refusals = transport.refusals_total()
    assert refusals.get("wrong_region", 0) >= 2 and refusals.get("wrong_shape", 0) == 1 and refusals.get("replay", 0) == 1


def test_an_aggregator_takes_only_the_clients_of_its_region(tmp_path, learner):
    with TokenStore.open(tmp_path / "state") as store:
        toks = store.add_many(["a", "b"])
        ids = {n: store.client_id(n) for n in toks}
    t = GrpcTransport("127.0.0.1:0", tokens=TokenStore.open(tmp_path / "state"), spec=learner.spec, membership=RegionMembership(0, 2))
    cs = {n: RawClient(t.address, toks[n]) for n in toks}
    try:
        for n, c in cs.items():
            if ids[n] % 2 == 0:
                c.register(learner.spec.digest())
            else:
                refused(lambda c=c: c.register(learner.spec.digest()), PD, f"belongs to region {ids[n] % 2}")
        assert t.available(0) == [i for i in ids.values() if i % 2 == 0]
    finally:
        for c in cs.values():
            c.close()
        t.close(grace_s=0.1)


def test_the_root_stage_equals_the_flat_weighted_mean():
    g = torch.Generator().manual_seed(0)
    n, d = 50, 33
    matrix = torch.randn(n, d, generator=g)
    weights = torch.rand(n, generator=g).double().numpy() * 10
    region = np.arange(n) % 3
    sums, totals = regional_mean(matrix, weights, region, 3)
    payloads = [pack_region_sum(sums[r], float(totals[r])) for r in range(3)]
    assert all(len(p) == region_sum_bytes(d) for p in payloads)
    out = RegionSumStage(3, 1, d).next(Batch(torch.zeros(3, d), np.ones(3), [0, 1, 2], payloads)).aggregate
    flat = (matrix.double() * torch.from_numpy(weights)[:, None]).sum(0) / weights.sum()
    assert torch.allclose(out.double(), flat, atol=1e-6)
    with pytest.raises(ValueError, match="fewer than engine.min_regions = 3"):
        RegionSumStage(3, 3, d).next(Batch(torch.zeros(2, d), np.ones(2), [0, 1], payloads[:2]))
