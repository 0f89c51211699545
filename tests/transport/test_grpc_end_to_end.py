"""End to end over the network: `fleetlearn server` and real `fleetlearn client`
processes on 127.0.0.1, with TLS and per-client tokens; and crash-safe resume
after `kill -9`."""

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fleetlearn.ops import RunStore

pytestmark = pytest.mark.slow

CONFIG = """
seed = 3
[data]
dataset = "digits"
clients = 3
partition = "iid"
[client]
local_epochs = 2
batch_size = 16
lr = 0.05
momentum = 0.9
[server]
rounds = {rounds}
cohort = 3
[monitoring]
detectors = []
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fl(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "fleetlearn", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def certs_and_tokens(tmp: Path, names: list[str], state: str | Path | None = None) -> list[str]:
    """`fleetlearn certs --out tmp/certs` and `fleetlearn token add NAME --state STATE` for each name,
    in this process (what the commands call; tests/transport/test_grpc_commands.py and
    test_tokens_shared.py run the commands themselves): a `python -m fleetlearn` costs seconds."""
    from fleetlearn.transport.grpc import commands, make_certs

    if not (tmp / "certs" / "ca.pem").exists():
        make_certs(tmp / "certs")
    return [commands.token_add(tmp / "state" if state is None else state, name) for name in names]


def setup(tmp: Path, rounds: int) -> list[str]:
    (tmp / "run.toml").write_text(CONFIG.format(rounds=rounds))
    tokens = certs_and_tokens(tmp, [f"site{i}" for i in range(3)])
    assert all(t not in (tmp / "state" / "tokens.db").read_bytes().decode("latin-1") for t in tokens)  # stored hashed
    return tokens


def start_server(tmp: Path, port: int, *extra: str):
    return fl("server", *extra, "--listen", f"127.0.0.1:{port}", "--state", str(tmp / "state"), "--certs", str(tmp / "certs"),
              "--min-clients", "3", "--wait-s", "300", "--runs-dir", str(tmp / "runs"), "--json", cwd=tmp)


def wait_listening(port: int, timeout: float = 120) -> None:
    end = time.time() + timeout
    while time.time() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port}")


def start_clients(tmp: Path, port: int, tokens: list[str]):
    return [
        fl("client", "--server", f"127.0.0.1:{port}", "--token", tok, "--config", str(tmp / "run.toml"),
           "--client-index", str(i), "--tls-ca", str(tmp / "certs" / "ca.pem"), "--give-up-after", "300", cwd=tmp)
        for i, tok in enumerate(tokens)
    ]


def finish(server, clients, timeout=900):
    out, err = server.communicate(timeout=timeout)
    for c in clients:
        try:
            c.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            c.kill()
    assert server.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_tls_tokens_and_three_client_processes_train_digits(tmp_path):
    tokens = setup(tmp_path, rounds=6)
    port = free_port()
    server = start_server(tmp_path, port, str(tmp_path / "run.toml"))
    wait_listening(port)  # the server waits for its 3 clients before round 1
    # A client with a wrong token is refused with a clear message and exit status 2.
    bad = subprocess.run([sys.executable, "-m", "fleetlearn", "client", "--server", f"127.0.0.1:{port}", "--token", "nope",
                          "--config", str(tmp_path / "run.toml"), "--client-index", "0", "--tls-ca", str(tmp_path / "certs" / "ca.pem"),
                          "--give-up-after", "30"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert bad.returncode == 2 and "token" in bad.stderr.lower()
    clients = start_clients(tmp_path, port, tokens)
    summary = finish(server, clients)
    assert summary["rounds"] == 6
    assert summary["final_accuracy"] >= 0.90, summary
    store = RunStore.open(summary["run_dir"])
    recs = store.records()
    assert all(r.accepted == 3 for r in recs)
    assert recs[-1].extra["refusals"] is not None


def _rounds_committed(run_root: Path) -> int:
    dbs = list(run_root.glob("*/run.db"))
    if not dbs:
        return 0
    try:
        with sqlite3.connect(dbs[0]) as conn:
            return conn.execute("select count(*) from rounds").fetchone()[0]
    except sqlite3.OperationalError:  # the store is being created
        return 0


def uninterrupted(run_toml: Path, tmp: Path, clients: int):
    """The uninterrupted run of `run_toml`, for comparison: the same server and client code over
    gRPC on 127.0.0.1, in this process (`NetworkRun`: seconds, where server and client processes
    take ~15 s to start on 2 busy cores).  Its model is bit for bit the processes' (the kill -9
    tests assert equality against it, so a difference would fail them, not pass unseen).
    Returns (final model, summary)."""
    from grpc_test_support import NetworkRun

    from fleetlearn.config import load_config

    tmp.mkdir()
    net = NetworkRun(load_config(run_toml), tmp, clients=clients)
    summary = net.run()
    return net.coordinator.params.clone(), summary


def test_kill_9_mid_run_then_resume_loses_no_committed_round(tmp_path):
    rounds = 4

    crash = tmp_path / "crash"
    crash.mkdir()
    tokens = setup(crash, rounds)
    port = free_port()
    server = start_server(crash, port, str(crash / "run.toml"))
    clients = start_clients(crash, port, tokens)
    deadline = time.time() + 600
    while _rounds_committed(crash / "runs") < 2 and time.time() < deadline:
        time.sleep(0.05)
    server.send_signal(signal.SIGKILL)
    server.wait()
    committed = _rounds_committed(crash / "runs")
    assert 2 <= committed < rounds
    run_dir = next((crash / "runs").glob("*/run.db")).parent
    server = start_server(crash, port, "--resume", str(run_dir))
    resumed = finish(server, clients)
    assert resumed["rounds"] == rounds
    recs = RunStore.open(run_dir).records()
    assert [r.round for r in recs] == list(range(1, rounds + 1))  # no committed round lost, none repeated
    # Same seed, same cohorts, same client seeds, and the server sums updates in client-id
    # order whatever order they arrive in: the resumed run's model is the uninterrupted one's.
    _, final_crash, _ = RunStore.open(run_dir).load_checkpoint()
    final_ref, reference = uninterrupted(crash / "run.toml", tmp_path / "ref", clients=3)
    assert torch.equal(final_crash, final_ref), float((final_crash - final_ref).abs().max())
    assert abs(resumed["final_accuracy"] - reference.final_accuracy) <= 0.01
