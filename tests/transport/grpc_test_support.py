"""Helpers shared by the gRPC transport tests (a uniquely named module: `conftest` is
not importable by name when several test folders have one)."""

from __future__ import annotations

import threading

import torch

from fleetlearn.compression import parse_chain
from fleetlearn.learners import ClientData
from fleetlearn.messages import Task
from fleetlearn.transport.grpc import GrpcTransport

FEATURES, CLASSES = 4, 3


def tiny_data(seed: int, n: int = 24) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return ClientData(x[:-6], y[:-6], x[-6:], y[-6:])


def make_task(round: int, version: int, params: torch.Tensor, deadline_s: float | None = 5.0, **config) -> Task:
    payload, _ = parse_chain("none").encode(params)
    hp = {"lr": 0.1, "local_epochs": 2, "batch_size": 4, "seed": 7, **config}
    return Task(round=round, version=version, payload=payload, codec="none", spec=hp, deadline_s=deadline_s)


class DispatchThread:
    """Runs `transport.dispatch` on a thread (as the Coordinator would) and records the replies."""

    def __init__(self, transport: GrpcTransport, task: Task, cohort):
        self.replies = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(transport, task, list(cohort)), daemon=True)
        self._thread.start()

    def _run(self, transport, task, cohort) -> None:
        try:
            for r in transport.dispatch(task, cohort):
                self.replies.append(r)
        except BaseException as exc:  # noqa: BLE001 - re-raised in join
            self.error = exc

    def join(self, timeout: float = 20.0):
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "dispatch did not end"
        if self.error is not None:
            raise self.error
        return self.replies


class NetworkRun:
    """A whole run over gRPC in one process: the Coordinator `fleetlearn server` builds, and
    `clients` real `fleetlearn client`s (threads, partition slots 0..clients-1), as the CLI
    would run them.  `run()` returns the summary after every client heard the run finished.
    `client_options`: extra `commands.client` arguments by client index (e.g. memory_mb);
    `stopped`: how a client's report must say it stopped, by index (default "finished")."""

    def __init__(self, cfg, tmp_path, clients: int, client_options: dict | None = None, stopped: dict | None = None, dial=None):
        from fleetlearn.engine import build_coordinator
        from fleetlearn.transport.grpc import commands

        self.cfg, self.state, self.clients = cfg, tmp_path / "state", clients
        self.client_options = client_options or {}
        self.dial = dial or (lambda address: address)  # what the clients are given to dial: the server's address -> --server
        self.expect_stopped = {i: "finished" for i in range(clients)} | (stopped or {})
        holder = {}

        def make_transport(learner, runtime):
            holder["t"] = commands.server_transport(cfg, learner.spec, "127.0.0.1:0", self.state, heartbeat_interval_s=1.0, learner=learner)
            return holder["t"]

        self.coordinator = build_coordinator(cfg, store=False, transport_factory=make_transport)
        self.transport = holder["t"]
        self.start = self.coordinator.params.clone()
        self.reports: dict = {}

    def run(self):
        from fleetlearn.transport.grpc import commands

        t = self.transport
        try:
            toks = {i: commands.token_add(self.state, f"site-{i}") for i in range(self.clients)}
            threads = [threading.Thread(target=lambda i=i: self.reports.__setitem__(i, commands.client(
                self.dial(t.address), toks[i], self.cfg, **{"client_index": i, "give_up_after_s": 30, **self.client_options.get(i, {})})), daemon=True)
                for i in toks]
            for th in threads:
                th.start()
            self.coordinator.wait_for_clients = (self.clients, 20.0)
            summary = self.coordinator.run()
            t.finish()
            for th in threads:
                th.join(15)
        finally:
            t.close(grace_s=0.2)
        assert {i: r.stopped for i, r in self.reports.items()} == self.expect_stopped
        return summary


class ClientThreads:
    """Real clients (`run_client`) on threads, one per token name, each on `data[client id]`;
    `join()` waits for them and re-raises the first error."""

    def __init__(self, address: str, toks: dict, tokens, learner, data: dict):
        from fleetlearn.transport.grpc import Backoff, run_client

        self.errors: list[BaseException] = []

        def client(name: str) -> None:
            try:
                run_client(address, toks[name], learner, data[tokens.client_id(name)], name=name,
                           backoff=Backoff(0.05, 0.5), give_up_after_s=20)
            except BaseException as exc:  # noqa: BLE001 - re-raised in join
                self.errors.append(exc)

        self.threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in toks]
        for th in self.threads:
            th.start()

    def join(self, timeout: float = 10.0) -> None:
        for th in self.threads:
            th.join(timeout)
        if self.errors:
            raise self.errors[0]


def live_rss_mb() -> float:
    """This process's resident memory (MiB) after handing freed heap back to the system
    (glibc's malloc_trim), so what is measured is memory still held, not the allocator's
    cache of memory already freed."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: plain RSS (an upper bound of what is held)
        pass
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class IdleStreams:
    """`grpc_idle_streams.py` in its own process: N calls that never send a message.
    `result()` is its JSON line (calls still open, status codes of the ended ones)."""

    def __init__(self, address: str, n: int, wait_s: float, token: str | None = None):
        import subprocess
        import sys
        from pathlib import Path

        script = Path(__file__).with_name("grpc_idle_streams.py")
        self.proc = subprocess.Popen([sys.executable, str(script), address, str(n), str(wait_s), *([token] if token else [])],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def result(self) -> dict:
        import json

        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"grpc_idle_streams.py failed: {self.proc.stderr.read()}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except Exception:  # noqa: BLE001
                self.proc.kill()
