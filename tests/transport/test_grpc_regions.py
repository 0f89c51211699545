"""Regional aggregators over gRPC (issue 18, item 2): real processes on 127.0.0.1 -- a root
(`fleetlearn server` with engine.region_aggregators = true), two `fleetlearn aggregator`s
(TLS and their own tokens at the root) and two `fleetlearn client`s in each region (TLS,
tokens from one store shared by the aggregators; client c belongs to region c mod 2).

- The final global model equals a flat server's (same seed, same clients, same ids) within
  1e-5: the regions change only the order of the weighted sum.
- kill -9 one aggregator mid-round: the round is recorded with that region's failure and
  its reason, the next round proceeds with the other region, and once the aggregator is
  back its clients (who kept retrying) report again.
- Under engine.min_regions = 2 the same kill fails the round cleanly (model unchanged).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from test_grpc_end_to_end import certs_and_tokens, finish, fl, free_port, uninterrupted, wait_listening

from fleetlearn.ops import RunStore
from fleetlearn.transport.grpc import TokenStore

pytestmark = pytest.mark.slow

CLIENTS = 4
CONFIG = """
seed = 5
[data]
dataset = "digits"
clients = 4
partition = "iid"
[client]
local_epochs = 1
batch_size = 16
lr = 0.05
[server]
rounds = {rounds}
cohort = 4
max_examples_ratio = 100.0
[engine]
{engine}
[monitoring]
detectors = []
"""
REGIONS = "regions = 2\nregion_aggregators = true\nmin_regions = {min_regions}"


class Lines:
    """A process's stdout and stderr lines as they come (read on threads)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.lines, self.out = proc, [], []
        for stream, sink in ((proc.stdout, self.out), (proc.stderr, self.lines)):
            threading.Thread(target=self._read, args=(stream, sink), daemon=True).start()

    def _read(self, stream, sink) -> None:
        for line in stream:
            sink.append(line)
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float = 180) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if any(text in line for line in list(self.lines)):
                return
            assert self.proc.poll() is None, "".join(self.lines)[-3000:]
            time.sleep(0.05)
        raise AssertionError(f"no {text!r} in: {''.join(self.lines)[-3000:]}")


def _setup(tmp: Path, rounds: int, engine: str) -> tuple[list[str], list[int]]:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "run.toml").write_text(CONFIG.format(rounds=rounds, engine=engine))
    tokens = certs_and_tokens(tmp, [f"site{i}" for i in range(CLIENTS)])
    with TokenStore.open(tmp / "state") as store:
        ids = [store.client_id(f"site{i}") for i in range(CLIENTS)]
    return tokens, ids


def _root_tokens(tmp: Path) -> list[str]:
    return certs_and_tokens(tmp, [f"region{r}" for r in range(2)], state=tmp / "root-state")


def _server(tmp: Path, port: int, state: str, min_clients: int):
    return fl("server", str(tmp / "run.toml"), "--listen", f"127.0.0.1:{port}", "--state", str(tmp / state), "--certs", str(tmp / "certs"),
              "--min-clients", str(min_clients), "--wait-s", "300", "--runs-dir", str(tmp / "runs"), "--heartbeat-s", "1.0", "--json", cwd=tmp)


def _aggregator(tmp: Path, region: int, port: int, root: int, token: str, env: dict | None = None):
    return fl("aggregator", str(tmp / "run.toml"), "--region", str(region), "--root", f"127.0.0.1:{root}", "--token", token,
              "--listen", f"127.0.0.1:{port}", "--state", str(tmp / "state"), "--certs", str(tmp / "certs"),
              "--tls-ca", str(tmp / "certs" / "ca.pem"), "--min-clients", "2", "--wait-s", "300", "--heartbeat-s", "1.0",
              "--give-up-after", "300", cwd=tmp, env={**os.environ, **(env or {})})


def _clients(tmp: Path, address, tokens: list[str]):
    """`address(i)`: the HOST:PORT client i dials."""
    return [fl("client", "--server", address(i), "--token", tok, "--config", str(tmp / "run.toml"), "--client-index", str(i),
               "--tls-ca", str(tmp / "certs" / "ca.pem"), "--give-up-after", "300", cwd=tmp) for i, tok in enumerate(tokens)]


def _stop(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        try:
            p.communicate(timeout=30)
        except (subprocess.TimeoutExpired, ValueError):
            pass


def _regional_run(tmp: Path, rounds: int, min_regions: int = 1, hold: dict | None = None, root_waits_for: int = 2):
    """Root, two aggregators (region r on ports[r]) and four clients; returns (root, aggs, clients, ports, tokens).
    The root waits for `root_waits_for` aggregators before each round: 1 lets a round go on without a dead region
    (the first round may then start before the second aggregator registered)."""
    tokens, ids = _setup(tmp, rounds, REGIONS.format(min_regions=min_regions))
    agg_tokens = _root_tokens(tmp)
    root_port, ports = free_port(), [free_port(), free_port()]
    root = _server(tmp, root_port, "root-state", root_waits_for)
    try:
        wait_listening(root_port)
    except AssertionError:
        root.kill()
        raise AssertionError(root.communicate()[1][-3000:]) from None
    aggs = [Lines(_aggregator(tmp, r, ports[r], root_port, agg_tokens[r], (hold or {}).get(r))) for r in range(2)]
    for p in ports:
        wait_listening(p)
    clients = _clients(tmp, lambda i: f"127.0.0.1:{ports[ids[i] % 2]}", tokens)
    return root, aggs, clients, ports, agg_tokens, root_port


def _records(summary: dict):
    return RunStore.open(summary["run_dir"]).records()


def test_two_regions_equal_flat_fedavg_over_the_same_updates(tmp_path):
    flat = tmp_path / "flat"
    _setup(flat, 2, "")  # the same run without regions, over gRPC in this process (`uninterrupted`)
    final_ref, _ = uninterrupted(flat / "run.toml", tmp_path / "flat-run", clients=CLIENTS)

    reg = tmp_path / "regions"
    root, aggs, clients, _, _, _ = _regional_run(reg, 2)
    try:
        summary = finish(root, [a.proc for a in aggs] + clients)
    finally:
        _stop([a.proc for a in aggs] + clients)
    _, final, _ = RunStore.open(summary["run_dir"]).load_checkpoint()
    assert not torch.equal(final, RunStore.open(summary["run_dir"]).load_checkpoint(1)[1])  # it trained on
    assert torch.allclose(final, final_ref, atol=1e-5, rtol=0), float((final - final_ref).abs().max())
    records = _records(summary)
    assert [r.status for r in records] == ["ok"] * 2
    for r in records:
        assert r.accepted == 2 and r.extra["hierarchy_regions_reporting"] == 2 and r.extra["hierarchy_failed_regions"] == []
        assert r.extra["hierarchy_clients"] == CLIENTS
        # bytes on both hops: the root received two float64 sums; the clients uploaded to their aggregators
        assert r.uplink_bytes == r.extra["hierarchy_bytes_forwarded"] > 0
        assert r.extra["hierarchy_client_uplink_bytes"] > 0 and r.extra["hierarchy_client_downlink_bytes"] > 0
    assert all(a.proc.returncode == 0 for a in aggs), [a.lines[-5:] for a in aggs]


def test_kill_9_an_aggregator_mid_round_is_a_region_failure_and_its_clients_come_back(tmp_path):
    release = tmp_path / "release"
    # Region 1 holds round 2's forward (then is killed); region 0 holds round 3's until region 1 is back.
    root, aggs, clients, ports, agg_tokens, root_port = _regional_run(
        tmp_path, 4, hold={1: {"FLEETLEARN_AGGREGATOR_HOLD": "2"}, 0: {"FLEETLEARN_AGGREGATOR_HOLD": f"3:{release}"}}, root_waits_for=1)
    restarted = None
    try:
        aggs[1].wait_for("holding round 2")
        aggs[1].proc.kill()  # SIGKILL, mid-round: its clients' updates are in, its sum never leaves
        aggs[1].proc.wait()
        aggs[0].wait_for("holding round 3")  # round 3 runs with region 0 alone
        restarted = Lines(_aggregator(tmp_path, 1, ports[1], root_port, agg_tokens[1]))
        restarted.wait_for("registered with")
        release.write_text("go")
        summary = finish(root, [a.proc for a in aggs[:1]] + [restarted.proc] + clients)
    finally:
        _stop([a.proc for a in aggs] + clients + ([restarted.proc] if restarted else []))
    records = _records(summary)
    assert [r.status for r in records] == ["ok"] * 4, [(r.status, r.reason) for r in records]
    r1, r2, r3, r4 = records
    assert r2.extra["hierarchy_failed_regions"] == [1] and r2.extra["hierarchy_regions_reporting"] == 1
    why = r2.extra["hierarchy_region_failures"]["1"]
    assert why.startswith("dropped") and "heartbeat" in why, why
    assert r2.accepted == 1 and r2.dropped == 1 and r2.version == r1.version + 1
    # the next round proceeds with the other region
    assert r3.selected == 1 and r3.extra["hierarchy_failed_regions"] == [1] and r3.version == r2.version + 1
    assert "no aggregator" in r3.extra["hierarchy_region_failures"]["1"]
    # region 1's clients were not lost: they re-registered with the restarted aggregator
    assert r4.extra["hierarchy_regions_reporting"] == 2 and r4.extra["hierarchy_clients"] == CLIENTS


def test_under_min_regions_2_a_killed_aggregator_fails_the_round_cleanly(tmp_path):
    root, aggs, clients, ports, _, _ = _regional_run(tmp_path, 2, min_regions=2, hold={1: {"FLEETLEARN_AGGREGATOR_HOLD": "2"}}, root_waits_for=1)
    try:
        aggs[1].wait_for("holding round 2")
        aggs[1].proc.kill()
        aggs[1].proc.wait()
        orphans = [c for c in clients if f"127.0.0.1:{ports[1]}" in c.args]  # they retry until they give up: not waited for
        summary = finish(root, [aggs[0].proc] + [c for c in clients if c not in orphans])
    finally:
        _stop([a.proc for a in aggs] + clients)
    r1, r2 = _records(summary)
    # round 1 may start before the second aggregator registered: then it fails for the same reason
    assert r1.status == "ok" or "fewer than engine.min_regions = 2" in r1.reason
    for r in (r2,):
        assert r.status == "failed" and "fewer than engine.min_regions = 2" in r.reason and "model unchanged" in r.reason, r.reason
        assert r.version == r1.version and r.extra["hierarchy_failed_regions"] == [1]
    if r1.status == "ok":
        store = RunStore.open(summary["run_dir"])
        assert torch.equal(store.load_checkpoint()[1], store.load_checkpoint(r1.version)[1])
