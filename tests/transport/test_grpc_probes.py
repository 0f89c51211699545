"""Probe clients over gRPC: real `fleetlearn client --probe` processes on 127.0.0.1 with TLS
and tokens beside two ordinary clients.  The server checks each probe's update after the
wire, the decoder and the validators: the tampered probe (FLEETLEARN_PROBE_TAMPER=labels) is
flagged in round 1, the honest one never, and neither enters the model."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from fleetlearn.client.probe import PROBE_FEATURE, TAMPER_ENV
from fleetlearn.config import load_config
from fleetlearn.engine import build_coordinator
from fleetlearn.monitoring.detectors import alerts_of
from fleetlearn.monitoring.probe_clients import PROBE_CLIENTS_KEY, PROBE_STATUS
from fleetlearn.transport.grpc import commands
from fleetlearn.transport.grpc import fleetlearn_pb2 as pb
from fleetlearn.transport.grpc.server import RunRequirements

CONFIG = """
seed = 2
[data]
dataset = "digits"
clients = 2
partition = "iid"
[model]
name = "logistic"
[client]
local_epochs = 1
batch_size = 32
[server]
rounds = 2
cohort = 2
[monitoring]
detectors = []
"""


def _probe_process(tmp, address: str, token: str, tamper: str | None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != TAMPER_ENV}
    if tamper:
        env[TAMPER_ENV] = tamper
    return subprocess.Popen(
        [sys.executable, "-m", "fleetlearn", "client", "--server", address, "--token", token, "--config", str(tmp / "run.toml"),
         "--probe", "--tls-ca", str(tmp / "certs" / "ca.pem"), "--give-up-after", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp)


@pytest.mark.slow
def test_a_tampered_probe_process_is_flagged_in_round_one_and_probes_never_enter_the_model(tmp_path):
    (tmp_path / "run.toml").write_text(CONFIG)
    cfg = load_config(tmp_path / "run.toml")
    commands.certs(tmp_path / "certs")
    state = tmp_path / "state"
    holder = {}

    def make_transport(learner, device):
        holder["t"] = commands.server_transport(cfg, learner.spec, "127.0.0.1:0", state, cert_dir=tmp_path / "certs",
                                                heartbeat_interval_s=1.0)
        return holder["t"]

    coordinator = build_coordinator(cfg, store=False, transport_factory=make_transport)
    t = holder["t"]
    toks = {name: commands.token_add(state, name) for name in ("site-0", "site-1", "probe-ok", "probe-bad")}
    ca = tmp_path / "certs" / "ca.pem"
    reports: dict = {}
    threads = [threading.Thread(target=lambda i=i: reports.__setitem__(i, commands.client(
        t.address, toks[f"site-{i}"], cfg, client_index=i, tls_ca=ca, give_up_after_s=60)), daemon=True) for i in range(2)]
    procs = {}
    try:
        for th in threads:
            th.start()
        procs = {name: _probe_process(tmp_path, t.address, toks[name], "labels" if name == "probe-bad" else None)
                 for name in ("probe-ok", "probe-bad")}
        coordinator.wait_for_clients = (4, 120.0)
        summary = coordinator.run()
        ids = {c["name"]: c["client_id"] for c in t.clients()}
        probes = sorted(t.probe_clients())
        t.finish()
        for th in threads:
            th.join(30)
        outs = {name: p.communicate(timeout=60) for name, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        t.close(grace_s=0.2)
    assert all(p.returncode == 0 for p in procs.values()), {n: o[1][-2000:] for n, o in outs.items()}
    ok, bad = ids["probe-ok"], ids["probe-bad"]
    assert probes == sorted([ok, bad])  # known by the feature they announced
    first = summary.records[0]
    info = first.extra[PROBE_CLIENTS_KEY]
    assert info["checked"] == 2 and [f["client"] for f in info["failed"]] == [bad], info
    (alert,) = [a for a in alerts_of(first) if a["detector"] == "probe_client"]
    assert alert["clients"] == [bad] and alert["severity"] == "critical"
    for r in summary.records:  # only the two sites are aggregated; the honest probe always passes
        assert r.accepted == 2 and r.selected == 2
        assert {c.client_id for c in r.clients if c.status == PROBE_STATUS} == {ok, bad}
        assert ok not in [f["client"] for f in r.extra[PROBE_CLIENTS_KEY]["failed"]]


def test_a_run_that_cannot_check_probes_refuses_them_at_registration():
    req = RunRequirements(probe_refusal="compression.adaptive = true picks each client's chain per round")
    ask = pb.RegisterRequest(runtime_version=req.runtime, capabilities=pb.Capabilities(features=[PROBE_FEATURE]))
    assert "cannot check probe clients: compression.adaptive" in req.refusal(ask)
    assert req.refusal(pb.RegisterRequest(runtime_version=req.runtime)) is None  # an ordinary client is welcome
    assert RunRequirements().refusal(ask) is None  # a run that can check them takes them


def test_probe_cli_usage_errors_name_the_problem(tmp_path, capsys):
    from fleetlearn.cli import main

    (tmp_path / "run.toml").write_text(CONFIG)
    base = ["client", "--server", "127.0.0.1:1", "--token", "t", "--config", str(tmp_path / "run.toml"), "--probe"]
    assert main(base + ["--client-index", "0"]) == 2
    assert "--probe trains on the probes' known synthetic data" in capsys.readouterr().err
    (tmp_path / "adaptive.toml").write_text(CONFIG + '[compression]\nadaptive = true\nladder = ["none", "q8"]\n')
    assert main(base[:6] + [str(tmp_path / "adaptive.toml"), "--probe"]) == 2
    assert "--probe: the server cannot predict a probe's update in this run: compression.adaptive" in capsys.readouterr().err


def test_the_grpc_server_refuses_simulated_probe_devices(tmp_path):
    from fleetlearn.config import ConfigError

    cfg = load_config({"probes": {"clients": 1}})
    with pytest.raises(ConfigError, match="probes.clients = 1: .*fleetlearn client --probe"):
        commands.server_transport(cfg, None, "127.0.0.1:0", tmp_path / "state")
