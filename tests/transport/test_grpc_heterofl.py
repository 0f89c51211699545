"""HeteroFL over gRPC: each `fleetlearn client` declares its memory, the server assigns its
width by the run's `width_rule`, sends it only that width's sub-model, and aggregates the
sub-model deltas by coverage, as the simulation does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from grpc_test_support import NetworkRun

from fleetlearn.compression import parse_chain
from fleetlearn.config import ConfigError, load_config
from fleetlearn.engine import build_coordinator
from fleetlearn.transport.grpc import ClientRefused, GrpcTransport, TokenStore, commands, run_client
from fleetlearn.transport.grpc.local_data import client_from_config

# full_width_memory_mb = 512: the digits MLP [32] at width 0.5 needs ~257 MiB, at 0.25 ~130 MiB.
MEMORY = [600, 300, 150, 600, 300, 150]  # the six clients' declared memory: widths 1.0, 0.5, 0.25, twice
ROUNDS = 5


def _cfg():
    # 7 partition slots: token ids start at 1, so gRPC client i (id i + 1) trains slot i + 1 and
    # the simulation, with slot 0 excluded, trains the same slots under the same client ids.
    return load_config({"seed": 3, "data": {"dataset": "digits", "clients": 7, "partition": "iid"},
                        "model": {"hidden": [32], "widths": [1.0, 0.5, 0.25], "width_rule": "memory", "full_width_memory_mb": 512.0},
                        "client": {"local_epochs": 1, "batch_size": 16, "lr": 0.1},
                        "server": {"rounds": ROUNDS, "cohort": 6, "deadline_s": 60.0}, "monitoring": {"detectors": []}})


@pytest.mark.slow
def test_heterofl_over_grpc_sends_each_client_only_its_sub_model(tmp_path):
    cfg = _cfg()
    net = NetworkRun(cfg, tmp_path, clients=6, client_options={i: {"memory_mb": m, "client_index": i + 1} for i, m in enumerate(MEMORY)})
    plan = net.coordinator.learner.plan
    summary = net.run()
    assert [r.accepted for r in summary.records] == [6] * ROUNDS
    ids = {i: TokenStore.open(net.state).client_id(f"site-{i}") for i in range(6)}
    assert ids == {i: i + 1 for i in range(6)}
    # The width rule the simulation uses, from the memory each client declared.
    expect = {i: float(w) for i, w in enumerate(plan.width_for_memory(np.array(MEMORY, dtype=float)))}
    assert sorted(set(expect.values())) == [0.25, 0.5, 1.0]
    size = {w: len(parse_chain("none").encode(torch.zeros(plan.sub_dim(w)))[0]) for w in plan.widths}
    assert size[0.25] < size[0.5] < size[1.0]
    for i, rep in net.reports.items():
        assert rep.model_width == expect[i]
        # What the client received, counted on the client: its width's sub-model payload, every round.
        assert rep.task_bytes == [size[expect[i]]] * ROUNDS
    for r in summary.records:
        for c in r.clients:
            w = expect[c.client_id - 1]
            assert c.width == w
            # The bytes the server streamed to the client, and the sub-model delta it sent back.
            assert c.downlink_bytes == size[w] and c.uplink_bytes == size[w]

    # The simulation, same seed, same client ids, slots and widths: the same model.
    sim = build_coordinator(cfg, store=False)
    sim.excluded_clients = {0}
    sim.learner.client_widths = np.array([1.0] + [expect[i] for i in range(6)])
    ref = sim.run()
    assert ref.final_accuracy > 0.8
    assert abs(summary.final_accuracy - ref.final_accuracy) <= 0.002, (summary.final_accuracy, ref.final_accuracy)
    # Each client trains alone here and in a batched cohort there: equal up to float rounding.
    assert torch.allclose(net.coordinator.params, sim.params, atol=1e-5), float((net.coordinator.params - sim.params).abs().max())
    assert not torch.equal(net.coordinator.params, net.start)


def test_a_client_that_fits_no_width_is_refused_at_registration(tmp_path, capsys):
    from fleetlearn.cli import main

    cfg = _cfg()
    (tmp_path / "run.toml").write_text(cfg.to_toml())
    learner, data = client_from_config(cfg, client_index=1)
    server_learner = build_coordinator(cfg, store=False).learner
    tokens = TokenStore.open(tmp_path)
    tok = {n: tokens.add(n) for n in ("small", "cli", "silent", "fits")}
    t = GrpcTransport("127.0.0.1:0", tokens=tokens, spec=server_learner.spec, submodels=server_learner, heartbeat_interval_s=0.5)
    before = server_learner.client_widths.copy()
    try:
        with pytest.raises(ClientRefused, match=r"declares 100 MiB.*smallest sub-model of the run, model width 0\.25 of model\.widths.*needs 1\d\d\.?\d* MiB"):
            run_client(t.address, tok["small"], learner, data, memory_mb=100, give_up_after_s=10)
        # `fleetlearn client --memory-mb N`: the same refusal, one line, exit status 2.
        assert main(["client", "--server", t.address, "--token", tok["cli"], "--config", str(tmp_path / "run.toml"),
                     "--client-index", "1", "--memory-mb", "120", "--give-up-after", "10"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fleetlearn: error: FAILED_PRECONDITION: client declares 120 MiB") and "model.full_width_memory_mb = 512" in err
        with pytest.raises(ClientRefused, match=r"declared none.*--memory-mb"):
            run_client(t.address, tok["silent"], learner, data, memory_mb=0, give_up_after_s=10)
        # A plain (full-model) client cannot train the width it would be given.
        plain, _ = client_from_config(load_config({**cfg.to_dict(), "model": {"hidden": [32]}}), client_index=1)
        with pytest.raises(ClientRefused, match=r"assigns this client model width 0\.5.*announced widths \[1\.0\]"):
            run_client(t.address, tok["fits"], plain, data, memory_mb=300, give_up_after_s=10)
        assert t.refusals_total() == {"incompatible": 4}
        assert t.clients() == []
        assert np.array_equal(server_learner.client_widths, before)  # a refused client's width is not recorded
    finally:
        t.close(grace_s=0.1)


def test_the_grpc_transport_declares_heterofl():
    from fleetlearn import compat

    assert compat.has("transport", "grpc", "heterofl")
    assert not compat.has("transport", "grpc", "attack_simulation")
    cfg = load_config({**_cfg().to_dict(), "attack": {"kind": "sign_flip", "fraction": 0.5}})
    with pytest.raises(ConfigError, match=r"attack\.kind.*'grpc' transport does not carry it"):
        build_coordinator(cfg, store=False, transport_factory=lambda learner, device: None)
    # `fleetlearn run` cannot choose the server as its backend: the refusal names the command.
    with pytest.raises(ConfigError, match=r"engine\.backend = 'grpc': unknown backend; allowed: simulation, ray.*`fleetlearn server CONFIG`"):
        load_config({**_cfg().to_dict(), "engine": {"backend": "grpc"}})



def test_the_wire_carries_each_width_and_refuses_the_wrong_size(tmp_path):
    """Protocol level: the task names the width and carries exactly that sub-model; an update
    of the full model's size is refused; registering again at another width leaves the round."""
    import grpc
    from grpc_raw_client import RawClient
    from grpc_test_support import DispatchThread

    from fleetlearn.messages import Dropout, Task, Update

    learner = build_coordinator(_cfg(), store=False).learner
    plan, chain = learner.plan, parse_chain("none")
    tokens = TokenStore.open(tmp_path)
    tok = tokens.add("raw")
    t = GrpcTransport("127.0.0.1:0", tokens=tokens, spec=learner.spec, submodels=learner, heartbeat_interval_s=0.5)
    raw = RawClient(t.address, tok)
    try:
        reg = lambda mem, **kw: raw.register(learner.spec.digest(), widths=plan.widths, memory_mb=mem, **kw)  # noqa: E731
        with pytest.raises(grpc.RpcError, match="heterofl"):  # a client that cannot read TaskMeta.model_width
            reg(600)
        assert reg(600, features=["heterofl"]).model_width == 1.0
        assert reg(300, features=["heterofl"]).model_width == 0.5  # again, with less memory: the width follows
        raw.start_heartbeats()
        params = torch.randn(plan.dim)
        task = Task(round=1, version=0, payload=chain.encode(params)[0], codec="none", spec={"lr": 0.1}, deadline_s=5.0)
        d = DispatchThread(t, task, [raw.client_id])
        meta, payload, _ = raw.pull()
        assert meta.model_width == 0.5 and meta.payload_bytes == len(payload)
        assert torch.equal(chain.decode(payload, dim=plan.sub_dim(0.5)), plan.slice(params, 0.5))  # exactly the sub-model
        with pytest.raises(grpc.RpcError, match=f"dim {plan.dim}.*has {plan.sub_dim(0.5)}|cannot be the model's"):
            raw.push(1, 0, chain.encode(torch.zeros(plan.dim))[0])  # the full model's delta: not this client's
        reg(150, features=["heterofl"])  # now width 0.25: the task it holds is for 0.5
        (reply,) = d.join()
        assert isinstance(reply.message, Dropout) and "registered again at model width 0.25" in reply.message.reason
        assert t.refusals_total().get("wrong_shape") == 1
        # Next round: the 0.25 sub-model, and its delta is accepted.
        d = DispatchThread(t, Task(round=2, version=0, payload=task.payload, codec="none", spec={"lr": 0.1}, deadline_s=5.0), [raw.client_id])
        meta, payload, _ = raw.pull(after_round=1)
        assert meta.model_width == 0.25 and len(payload) == len(chain.encode(torch.zeros(plan.sub_dim(0.25)))[0])
        assert raw.push(2, 0, chain.encode(torch.ones(plan.sub_dim(0.25)))[0]).accepted
        (reply,) = d.join()
        assert isinstance(reply.message, Update) and reply.message.downlink_bytes == len(payload)
        assert learner.sub_dim_of(raw.client_id) == plan.sub_dim(0.25)  # what the Coordinator's decoder reads
    finally:
        raw.close()
        t.close(grace_s=0.1)


def test_a_client_trains_only_widths_its_model_has():
    from fleetlearn.transport.grpc import FleetClient

    cfg = _cfg()
    learner, data = client_from_config(cfg, client_index=1)
    c = FleetClient("127.0.0.1:1", "t", learner, data)
    assert c._learner_for(0.5).spec == learner.plan.specs[0.5] and c._learner_for(0.0) is learner
    for bad in (0.3, float("nan"), float("inf")):  # a task naming another width is skipped, not trained
        with pytest.raises(ValueError, match="width"):
            c._learner_for(bad)
    plain, _ = client_from_config(load_config({**cfg.to_dict(), "model": {"hidden": [32]}}), client_index=1)
    with pytest.raises(ValueError, match=r"model width 0\.5.*no widths"):
        FleetClient("127.0.0.1:1", "t", plain, data)._learner_for(0.5)
    with pytest.raises(ValueError, match="memory_mb"):
        FleetClient("127.0.0.1:1", "t", learner, data, memory_mb=-5)
