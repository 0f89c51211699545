"""The client: reconnects with backoff, survives a server crash and restart, loads its data."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from grpc_test_support import make_task, tiny_data

from fleetlearn.messages import Update
from fleetlearn.transport.grpc import (
    Backoff,
    GrpcTransport,
    client_data_from_config,
    client_data_from_import,
    client_from_config,
    learner_from_config,
    run_client,
)

HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ClientThread:
    def __init__(self, *args, **kwargs):
        self.report = None
        self.error = None
        self.stop = threading.Event()
        kwargs.setdefault("stop", self.stop)
        self.thread = threading.Thread(target=self._run, args=args, kwargs=kwargs, daemon=True)
        self.thread.start()

    def _run(self, *args, **kwargs):
        try:
            self.report = run_client(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            self.error = exc

    def join(self, timeout=10):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "client did not stop"
        if self.error:
            raise self.error
        return self.report


def test_backoff_grows_with_jitter_and_is_capped():
    import random

    b = Backoff(initial_s=0.1, max_s=1.0, multiplier=2.0, jitter=0.5)
    rng = random.Random(0)
    for attempt, cap in [(0, 0.1), (1, 0.2), (3, 0.8), (10, 1.0)]:
        ds = [b.delay(attempt, rng) for _ in range(200)]
        assert all(cap * 0.5 <= d <= cap for d in ds)
        assert max(ds) - min(ds) > cap * 0.3  # really jittered


def test_client_gives_up_when_nobody_answers(learner):
    t0 = time.monotonic()
    report = run_client(f"127.0.0.1:{free_port()}", "tok", learner, tiny_data(0), backoff=Backoff(0.05, 0.2), give_up_after_s=0.5)
    assert report.stopped.startswith("gave_up") and report.retries >= 2
    assert time.monotonic() - t0 < 3


def test_client_resumes_after_server_restart_with_a_newer_model(tokens, learner):
    tok = tokens.add("steady")
    cid = tokens.client_id("steady")
    a = GrpcTransport("127.0.0.1:0", tokens=tokens, spec=learner.spec, heartbeat_interval_s=0.2)
    port = a.port
    c = ClientThread(a.address, tok, learner, tiny_data(0), backoff=Backoff(0.05, 0.3), give_up_after_s=20)
    assert a.wait_available(1, timeout_s=10) == [cid]
    (r1,) = list(a.dispatch(make_task(1, 0, learner.init_params(0)), [cid]))
    assert isinstance(r1.message, Update)
    a.close(grace_s=0)  # the server goes away without saying the run finished

    time.sleep(0.3)  # the client notices and backs off
    b = GrpcTransport(f"127.0.0.1:{port}", tokens=tokens, spec=learner.spec, heartbeat_interval_s=0.2)
    try:
        assert b.wait_available(1, timeout_s=10) == [cid]  # re-registered with the same token: same id
        params = learner.init_params(1)
        (r6,) = list(b.dispatch(make_task(6, 5, params), [cid]))  # resumed run: later round, newer version
        assert isinstance(r6.message, Update) and (r6.message.round, r6.message.base_version) == (6, 5)
        b.finish()
        report = c.join()
    finally:
        b.close(grace_s=0)
    assert report.stopped == "finished" and report.rounds == [1, 6] and report.registrations == 2


def test_client_survives_kill_9_of_the_server_process(tmp_path, tokens, learner):
    """A real crash: the server process is SIGKILLed after round 1 and restarted with
    the same token store from the last committed round; the client carries on."""
    tok = tokens.add("survivor")
    cid = tokens.client_id("survivor")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    state = str(tokens.path.parent)

    def server(first: int, version: int, rounds: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(HERE / "grpc_server_process.py"), state, str(port), str(first), str(version), str(rounds)],
                                stdout=subprocess.PIPE, text=True, env=env)

    first = server(1, 0, 100)
    try:
        c = ClientThread(f"127.0.0.1:{port}", tok, learner, tiny_data(0), backoff=Backoff(0.05, 0.3), give_up_after_s=30)
        assert first.stdout.readline().strip() == "listening"
        line = first.stdout.readline().split()
        assert line[:3] == ["done", "1", "1"] and line[3] == f"{cid}:0"
        first.send_signal(signal.SIGKILL)  # mid-way through round 2 or between rounds: either way
        first.wait(10)
    finally:
        first.kill()
    resumed = server(2, 1, 2)  # the run store said: round 1 committed, model version 1
    try:
        out, _ = resumed.communicate(timeout=40)
    finally:
        resumed.kill()
    lines = [ln.split() for ln in out.strip().splitlines()]
    assert lines[0] == ["listening"]
    assert lines[1] == ["done", "2", "2", f"{cid}:1"] and lines[2] == ["done", "3", "3", f"{cid}:2"]
    report = c.join(timeout=15)
    assert report.stopped == "finished" and report.rounds[-2:] == [2, 3] and report.registrations >= 2


def test_stop_event_ends_the_client(transport, tokens, learner):
    c = ClientThread(transport.address, tokens.add("quitter"), learner, tiny_data(0), backoff=Backoff(0.05, 0.3))
    assert transport.wait_available(1, timeout_s=10)
    c.stop.set()
    assert c.join(timeout=5).stopped == "stopped"


# -- local data -----------------------------------------------------------------------------
CFG = {"data": {"dataset": "digits", "clients": 10}, "server": {"cohort": 5}, "model": {"hidden": [16]}}


def test_client_data_by_config_is_the_simulations_partition():
    from fleetlearn.config import load_config
    from fleetlearn.data import load_federated
    from fleetlearn.engine.factory import build_learner

    cfg = load_config(CFG)
    fed = load_federated(cfg.data, cfg.seed)
    data, nf, nc = client_data_from_config(cfg, 3)
    idx = torch.from_numpy(fed.train_indices(3))
    assert torch.equal(data.x, fed.x[idx]) and torch.equal(data.y, fed.y[idx])
    assert torch.equal(data.y_test, fed.y[torch.from_numpy(fed.test_indices(3))])
    # the client builds the same model as the server, so registration digests match
    assert learner_from_config(cfg, nf, nc).spec.digest() == build_learner(cfg, fed).spec.digest()
    with pytest.raises(ValueError, match="out of range"):
        client_data_from_config(cfg, 10)


def test_client_data_by_import_path(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    data = client_data_from_import("grpc_client_data_fn:local_blobs")
    assert data.x.dtype == torch.float32 and data.y.dtype == torch.int64
    assert data.x.shape == (8, 4) and data.x_test.shape == (4, 4)
    learner, d2 = client_from_config({**CFG, "data": {"dataset": "digits"}}, data_fn="grpc_client_data_fn:local_blobs", num_classes=None)
    assert learner.spec.shapes[-1] == (10,)  # digits has 10 classes whatever this client holds
    with pytest.raises(ValueError, match=r"must return \(x, y, x_test, y_test\)"):
        client_data_from_import("grpc_client_data_fn:not_four")
    with pytest.raises(ValueError, match="exactly one"):
        client_from_config(CFG, client_index=1, data_fn="grpc_client_data_fn:local_blobs")
