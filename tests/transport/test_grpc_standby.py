"""A standby that takes over (issue 18, item 1): real PostgreSQL (the `postgres_url` fixture),
two `fleetlearn server` processes on one run (a leader and `--standby`), four `fleetlearn
client` processes given both addresses.  kill -9 the leader mid-run: the standby takes the
leader lease, resumes from the last committed round and commits the next one; no committed
round is lost or repeated, and the final model equals an uninterrupted run's under the same
seed.  The time from the kill to the first round the standby commits is printed (BENCHMARKS.md)."""

from __future__ import annotations

import signal
import time
import urllib.request

import pytest
import sqlalchemy as sa
import torch
from postgres_server import fresh_database
from test_grpc_end_to_end import CONFIG, certs_and_tokens, finish, fl, free_port, uninterrupted

from fleetlearn.ops import RunStore

pytestmark = pytest.mark.slow

CLIENTS = 4
ROUNDS = 6
TTL = "2"


def _setup(tmp, rounds: int, state: str | None = None) -> list[str]:
    """The run's folder, certificates and CLIENTS tokens in `state` (default: the folder's own state/)."""
    tmp.mkdir()
    state = state or str(tmp / "state")
    (tmp / "run.toml").write_text(CONFIG.format(rounds=rounds).replace("clients = 3", f"clients = {CLIENTS}")
                                  .replace("cohort = 3", f"cohort = {CLIENTS}").replace("local_epochs = 2", "local_epochs = 1"))
    return certs_and_tokens(tmp, [f"site{i}" for i in range(CLIENTS)], state=state)


def _server(tmp, port: int, *extra: str, state: str | None = None):
    return fl("server", *extra, "--listen", f"127.0.0.1:{port}", "--state", state or str(tmp / "state"), "--certs", str(tmp / "certs"),
              "--min-clients", str(CLIENTS), "--wait-s", "300", "--runs-dir", str(tmp / "runs"), "--lease-ttl", TTL, "--json", cwd=tmp)


def _clients(tmp, servers: str, tokens: list[str]):
    return [fl("client", "--server", servers, "--token", tok, "--config", str(tmp / "run.toml"), "--client-index", str(i),
               "--tls-ca", str(tmp / "certs" / "ca.pem"), "--give-up-after", "300", cwd=tmp) for i, tok in enumerate(tokens)]


def _rounds(url: str, run_id: str) -> list[int]:
    eng = sa.create_engine(url)
    try:
        with eng.connect() as conn:
            return [r for (r,) in conn.execute(sa.text("select round from rounds where run_id = :r order by round"), {"r": run_id}).all()]
    except sa.exc.ProgrammingError:  # tables not created yet
        return []
    finally:
        eng.dispose()


def _leader_gauge(port: int) -> float | None:
    """`fleetlearn_leader` as the process on `port` serves it; None while nothing serves."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return None
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith("fleetlearn_leader ")]
    return values[0] if values else None


def test_kill_9_the_leader_and_the_standby_takes_over_losing_no_round(postgres_url, tmp_path):
    ha = tmp_path / "ha"
    state = fresh_database(postgres_url, "tok")
    tokens = _setup(ha, ROUNDS, state=state)  # the tokens in the run store's database: both servers read them there
    pa, pb = free_port(), free_port()
    deadline = time.time() + 300
    # Both servers name the run (--run-id): the standby starts first and waits for its leader to
    # start the run, as compose or Kubernetes would start them together.
    metrics = free_port()  # the standby's /metrics (a resume override: the leader serves none here)
    standby = _server(ha, pb, str(ha / "run.toml"), "--run-id", "fleet-1", "--standby",
                      "--set", f"monitoring.prometheus_port={metrics}", state=state)
    time.sleep(1.0)
    assert standby.poll() is None and not (ha / "runs" / "fleet-1").exists()  # it waits; it does not start the run
    leader = _server(ha, pa, str(ha / "run.toml"), "--run-id", "fleet-1", "--store", postgres_url, state=state)
    while not (ha / "runs" / "fleet-1" / "config.toml").exists() and time.time() < deadline:
        assert leader.poll() is None, leader.communicate()[1][-3000:]
        time.sleep(0.05)
    run_dir = ha / "runs" / "fleet-1"
    while _leader_gauge(metrics) is None and time.time() < deadline:
        assert standby.poll() is None, standby.communicate()[1][-3000:]
        time.sleep(0.02)
    assert _leader_gauge(metrics) == 0.0  # a waiting standby says so: "no leader" alerts are not fooled by it
    clients = _clients(ha, f"127.0.0.1:{pa},127.0.0.1:{pb}", tokens)
    while len(_rounds(postgres_url, run_dir.name)) < 2 and time.time() < deadline:
        assert leader.poll() is None, leader.communicate()[1][-3000:]
        time.sleep(0.02)
    assert standby.poll() is None  # it waited for the lease, serving no run
    leader.send_signal(signal.SIGKILL)  # mid-run: the next round's tasks are out
    killed_at = time.monotonic()
    leader.wait()
    before = _rounds(postgres_url, run_dir.name)
    while len(_rounds(postgres_url, run_dir.name)) <= len(before) and time.time() < deadline:
        assert standby.poll() is None, standby.communicate()[1][-3000:]
        time.sleep(0.02)
    takeover_s = time.monotonic() - killed_at
    seen = set()
    while 1.0 not in seen and standby.poll() is None and time.time() < deadline:
        seen.add(_leader_gauge(metrics))
        time.sleep(0.01)
    assert 1.0 in seen, seen  # the new leader reports it while it runs the remaining rounds
    print(f"\nstandby takeover: first committed round {takeover_s:.2f}s after kill -9 of the leader "
          f"(lease ttl {TTL}s, {CLIENTS} clients, round {len(before) + 1})")
    summary = finish(standby, clients)
    assert summary["rounds"] == ROUNDS and summary["run_id"] == run_dir.name
    assert _rounds(postgres_url, run_dir.name) == list(range(1, ROUNDS + 1))  # none lost, none committed twice
    store = RunStore.open(run_dir)
    assert store.lease_row()["token"] == 2 and not store.lease_row()["live"]  # the standby's, released when it finished
    # Same seed, cohorts and client seeds; the server sums updates in client-id order: the model
    # after the takeover is the uninterrupted run's.
    _, final, _ = store.load_checkpoint()
    final_ref, _ = uninterrupted(ha / "run.toml", tmp_path / "ref", clients=CLIENTS)
    assert torch.equal(final, final_ref), float((final - final_ref).abs().max())


@pytest.mark.parametrize("args, error", [
    (["--standby"], "--standby needs --resume RUN"),
    (["cfg.toml", "--lease-ttl", "0"], "--lease-ttl 0.0: allowed: a number of seconds > 0"),
    (["cfg.toml", "--lease-ttl", "nan"], "--lease-ttl nan: allowed"),
    (["cfg.toml", "--run-id", "../x"], "--run-id '../x': allowed: 1-64 letters"),
    (["--run-id", "fleet-1"], "--run-id needs the CONFIG"),
    (["cfg.toml", "--run-id", "fleet-1", "--resume", "other"], "give one of them"),
])
def test_bad_standby_flags_are_refused_naming_them(tmp_path, monkeypatch, capsys, args, error):
    from fleetlearn.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["server", *args]) == 2
    err = capsys.readouterr().err
    assert error in err, err[-2000:]

