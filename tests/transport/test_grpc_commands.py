"""The functions the CLI calls: certs, tokens, and a client built from a run config."""

from __future__ import annotations

import threading

import torch

from fleetlearn.compression import parse_chain
from fleetlearn.config import load_config
from fleetlearn.messages import Task, Update
from fleetlearn.transport.grpc import commands
from fleetlearn.transport.grpc.local_data import client_from_config

CFG = {"data": {"dataset": "digits", "clients": 10}, "server": {"cohort": 2}, "model": {"hidden": [16]}}


def test_token_commands(tmp_path):
    tok = commands.token_add(tmp_path, "phone")
    infos = commands.token_list(tmp_path)
    assert [(i.name, i.active) for i in infos] == [("phone", True)]
    assert tok not in repr(infos)
    assert commands.token_revoke(tmp_path, "phone") is True
    assert [i.active for i in commands.token_list(tmp_path)] == [False]


def test_server_and_clients_from_a_run_config_with_tls(tmp_path):
    cfg = load_config(CFG)
    paths = commands.certs(tmp_path / "certs")
    learner, _ = client_from_config(cfg, client_index=0)
    t = commands.server_transport(cfg, learner.spec, "127.0.0.1:0", tmp_path / "state", cert_dir=tmp_path / "certs", heartbeat_interval_s=0.2)
    try:
        toks = {i: commands.token_add(tmp_path / "state", f"device-{i}") for i in (3, 7)}
        reports = {}
        threads = [
            threading.Thread(target=lambda i=i: reports.__setitem__(i, commands.client(
                t.address, toks[i], cfg, client_index=i, tls_ca=paths.ca_cert, name=f"device-{i}", give_up_after_s=20)), daemon=True)
            for i in toks
        ]
        for th in threads:
            th.start()
        ids = t.wait_available(2, timeout_s=20)
        assert len(ids) == 2
        params = learner.init_params(0)
        task = Task(1, 0, parse_chain("none").encode(params)[0], "none", {"lr": 0.05, "local_epochs": 1, "batch_size": 8}, deadline_s=20.0)
        replies = list(t.dispatch(task, ids))
        assert len(replies) == 2 and all(isinstance(r.message, Update) for r in replies)
        for r in replies:
            delta = parse_chain("none").decode(r.message.payload)
            assert delta.shape == params.shape and torch.isfinite(delta).all() and delta.abs().sum() > 0
        t.finish()
        for th in threads:
            th.join(15)
        assert {i: r.stopped for i, r in reports.items()} == {3: "finished", 7: "finished"}
    finally:
        t.close(grace_s=0.2)


def test_server_transport_serves_the_adaptive_ladder(tmp_path):
    ladder = ["none", "q8", "ef | topk:0.01 | q8"]
    cfg = load_config({**CFG, "compression": {"adaptive": True, "ladder": ladder}, "server": {"cohort": 2, "deadline_s": 5.0}})
    learner, _ = client_from_config(cfg, client_index=0)
    t = commands.server_transport(cfg, learner.spec, "127.0.0.1:0", tmp_path / "state")
    try:
        req = t.requirements
        assert req.ladder == tuple(parse_chain(c).spec for c in ladder) and req.uplink == "none"
        assert req.update_bytes is None  # rungs differ in size: bounded per rung instead
        assert [hi for _, hi in req.rung_bytes] == [parse_chain(c).estimate_bytes(learner.spec.dim) for c in ladder]
    finally:
        t.close(grace_s=0.2)


def test_a_block_topk_uplink_over_grpc(tmp_path):
    # Block top-k payloads (support id 4) pass the server's size bound and decode on the far side.
    from grpc_test_support import NetworkRun

    chain = "ef | topk:0.2,block=8 | q2 | zstd"
    cfg = load_config({**CFG, "seed": 2, "compression": {"uplink": chain}, "monitoring": {"detectors": []},
                       "server": {"cohort": 3, "rounds": 2, "deadline_s": 30.0}, "client": {"local_epochs": 1}})
    net = NetworkRun(cfg, tmp_path, clients=3)
    summary = net.run()
    assert [r.accepted for r in summary.records] == [3, 3] and summary.failed_rounds == 0
    dim = net.coordinator.params.numel()
    bound = parse_chain(chain).estimate_bytes(dim)
    for rec in summary.records:
        assert len(rec.clients) == 3
        for c in rec.clients:
            assert c.codec == chain and 0 < c.uplink_bytes <= bound < 4 * dim / 8  # far below float32's 4 bytes an entry
    assert not torch.equal(net.coordinator.params, net.start)


def test_a_subset_uplink_over_grpc_is_averaged_by_coverage(tmp_path):
    # The clients get the subset chain at registration and send random subsets of their
    # updates; the server averages each coordinate over the clients that sent it (CoverageStage).
    from grpc_test_support import NetworkRun

    chain = "subset:0.25,block=16 | q2:stochastic | zstd"
    cfg = load_config({**CFG, "seed": 4, "compression": {"uplink": chain}, "monitoring": {"detectors": []},
                       "server": {"cohort": 3, "rounds": 2, "deadline_s": 30.0}, "client": {"local_epochs": 1}})
    net = NetworkRun(cfg, tmp_path, clients=3)
    summary = net.run()
    dim = net.coordinator.params.numel()
    assert [r.accepted for r in summary.records] == [3, 3] and summary.failed_rounds == 0
    for rec in summary.records:
        assert 0 < rec.extra["coverage_clients"] < 3
        assert all(c.codec == chain and 0 < c.uplink_bytes < 4 * dim // 10 for c in rec.clients)
    assert not torch.equal(net.coordinator.params, net.start)


def test_target_ratio_over_grpc_resolves_to_subsets_for_the_clients(tmp_path):
    # The server resolves target_ratio to the subset chain (the run averages with the plain
    # mean) and hands it to the clients at registration.
    from grpc_test_support import NetworkRun

    cfg = load_config({**CFG, "seed": 4, "compression": {"target_ratio": 20}, "monitoring": {"detectors": []},
                       "server": {"cohort": 3, "rounds": 1, "deadline_s": 30.0}, "client": {"local_epochs": 1}})
    net = NetworkRun(cfg, tmp_path, clients=3)
    summary = net.run()
    dim = net.coordinator.params.numel()
    chain = cfg.uplink_chain(net.coordinator.learner.spec)
    assert chain.startswith("subset:1.0,block=16 | q2:dither") and summary.uplink_chain == chain
    assert summary.records[0].accepted == 3 and "coverage_clients" in summary.records[0].extra
    assert all(c.codec == chain and 0 < c.uplink_bytes <= 4 * dim // 20 for c in summary.records[0].clients)


def test_the_cli_says_what_certificates_cover_and_refuses_plaintext_off_loopback(tmp_path, capsys):
    from fleetlearn.cli import main

    assert main(["certs", "--out", str(tmp_path / "local")]) == 0
    out = capsys.readouterr().out
    assert "valid for 127.0.0.1, localhost only" in out and "pass --host NAME" in out
    assert main(["certs", "--out", str(tmp_path / "remote"), "--host", "fleet.example"]) == 0
    assert "valid for fleet.example only" in capsys.readouterr().out

    cfg = tmp_path / "run.toml"
    cfg.write_text('[data]\ndataset = "digits"\nclients = 4\n[server]\nrounds = 1\ncohort = 1\n')
    common = [str(cfg), "--state", str(tmp_path / "state"), "--runs-dir", str(tmp_path / "runs"), "--wait-s", "0.5"]
    assert main(["server", *common, "--listen", "0.0.0.0:0"]) == 2
    err = capsys.readouterr().err
    assert "refusing to serve plaintext gRPC on 0.0.0.0:0" in err and "--insecure" in err
    t = commands.server_transport(load_config(CFG), client_from_config(load_config(CFG), client_index=0)[0].spec,
                                  "0.0.0.0:0", tmp_path / "state", insecure=True)
    t.close(grace_s=0.1)
