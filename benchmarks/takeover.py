"""A standby that takes over (issue 18, item 1): how long after kill -9 of the leader the
standby commits its first round.

    .venv/bin/python benchmarks/takeover.py                      # lease TTL 2 and 10 s, 3 repeats each
    .venv/bin/python benchmarks/takeover.py --ttl 2 --repeats 1

Each repeat: a throwaway PostgreSQL server on 127.0.0.1 (Debian's package, as the tests
start it: tests/postgres_server.py), a leader `fleetlearn server --store postgresql://...`
and a standby `fleetlearn server --resume RUN --standby` on the same run, four `fleetlearn
client` processes given both addresses (TLS, tokens), digits, 6 rounds.  Once two rounds are
committed the leader is killed with SIGKILL while the next round's tasks are out.  Polling the
run store (every 20 ms), the script records when the standby holds the lease (its fencing
token changes) and when it commits its first round, both from the kill; and, for scale, the
median wall time of the rounds committed before the kill (their records' `wall_seconds`).  Every repeat also checks that no
committed round is lost or repeated (the rounds are 1..6 at the end).

What bounds the takeover: the dead leader's lease must expire (`--lease-ttl`), the standby
polls for it every min(0.5, max(0.05, TTL / 10)) s, then loads the run (model, client state,
privacy ledger); the clients notice the broken connection and fail over to the next address
with backoff, register again, and the round runs.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the throwaway PostgreSQL server the tests use

from postgres_server import postgres_server, unavailable_reason  # noqa: E402

CLIENTS = 4
ROUNDS = 6
CONFIG = """
seed = 3
[data]
dataset = "digits"
clients = {clients}
partition = "iid"
[client]
local_epochs = 1
batch_size = 16
lr = 0.05
[server]
rounds = {rounds}
cohort = {clients}
deadline_s = 60
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fl(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fleetlearn", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=cwd)


def _state(url: str, run_id: str, walls: dict | None = None) -> tuple[list[int], int | None]:
    """Committed rounds and the lease's fencing token (`walls`: filled with each round's wall seconds)."""
    eng = sa.create_engine(url)
    try:
        with eng.connect() as conn:
            rows = conn.execute(sa.text("select round, wall_seconds from rounds where run_id = :r order by round"), {"r": run_id}).all()
            tok = conn.execute(sa.text("select token from leader_lease where run_id = :r"), {"r": run_id}).scalar()
            if walls is not None:
                walls.update({r: w for r, w in rows})
            return [r for r, _ in rows], tok
    except sa.exc.ProgrammingError:
        return [], None
    finally:
        eng.dispose()


def one(url: str, ttl: float, work: Path) -> dict:
    work.mkdir(parents=True)
    (work / "run.toml").write_text(CONFIG.format(clients=CLIENTS, rounds=ROUNDS))
    subprocess.run([sys.executable, "-m", "fleetlearn", "certs", "--out", str(work / "certs")], check=True, capture_output=True)
    tokens = [subprocess.run([sys.executable, "-m", "fleetlearn", "token", "add", f"site{i}", "--state", str(work / "state")],
                             check=True, capture_output=True, text=True).stdout.strip() for i in range(CLIENTS)]
    common = ["--state", str(work / "state"), "--certs", str(work / "certs"), "--min-clients", str(CLIENTS), "--wait-s", "300",
              "--runs-dir", str(work / "runs"), "--lease-ttl", str(ttl), "--json"]
    pa, pb = _free_port(), _free_port()
    procs = []
    try:
        leader = _fl("server", str(work / "run.toml"), "--store", url, "--listen", f"127.0.0.1:{pa}", *common, cwd=work)
        procs.append(leader)
        deadline = time.time() + 300
        while not list((work / "runs").glob("*/config.toml")):
            if leader.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the leader did not start: {leader.communicate()[1][-2000:]}")
            time.sleep(0.05)
        run_dir = next((work / "runs").glob("*/config.toml")).parent
        standby = _fl("server", "--resume", str(run_dir), "--standby", "--listen", f"127.0.0.1:{pb}", *common, cwd=work)
        procs.append(standby)
        procs += [_fl("client", "--server", f"127.0.0.1:{pa},127.0.0.1:{pb}", "--token", tok, "--config", str(work / "run.toml"),
                      "--client-index", str(i), "--tls-ca", str(work / "certs" / "ca.pem"), "--give-up-after", "300", cwd=work)
                  for i, tok in enumerate(tokens)]
        walls: dict[int, float] = {}
        while len(walls) < 2:
            _state(url, run_dir.name, walls)
            if leader.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the leader stopped: {leader.communicate()[1][-2000:]}")
            time.sleep(0.02)
        leader.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        leader.wait()
        before, token0 = _state(url, run_dir.name)
        lease_s = commit_s = None
        while commit_s is None:
            rounds, tok = _state(url, run_dir.name)
            now = time.monotonic() - killed
            if lease_s is None and tok is not None and tok != token0:
                lease_s = now
            if len(rounds) > len(before):
                commit_s = now
            if standby.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the standby stopped: {standby.communicate()[1][-2000:]}")
            time.sleep(0.02)
        out, err = standby.communicate(timeout=600)
        if standby.returncode != 0:
            raise RuntimeError(f"the standby failed: {err[-2000:]}")
        rounds, _ = _state(url, run_dir.name)
        if rounds != list(range(1, ROUNDS + 1)):
            raise RuntimeError(f"committed rounds {rounds}: one lost or repeated")
        return {"ttl": ttl, "lease_s": lease_s, "commit_s": commit_s, "killed_after_round": len(before),
                "round_s": statistics.median(walls.values())}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ttl", type=float, nargs="+", default=[2.0, 10.0], help="leader lease TTLs (s)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    why = unavailable_reason()
    if why is not None:
        print(f"no PostgreSQL here: {why}", file=sys.stderr)
        return 2
    rows = []
    with postgres_server() as url, tempfile.TemporaryDirectory() as tmp:
        for ttl in args.ttl:
            for i in range(args.repeats):
                row = one(url, ttl, Path(tmp) / f"ttl{ttl}-{i}")
                rows.append(row)
                print(f"ttl {ttl:g}s repeat {i}: lease taken {row['lease_s']:.2f}s, first commit {row['commit_s']:.2f}s after the kill "
                      f"(killed after round {row['killed_after_round']}; a round takes {row['round_s']:.2f}s)", flush=True)
    print(f"\n| lease TTL s | repeats | lease taken s (median, max) | first committed round s (median, max) | a round before the kill s |")
    print("|---:|---:|---:|---:|---:|")
    for ttl in args.ttl:
        sel = [r for r in rows if r["ttl"] == ttl]
        ls, cs = [r["lease_s"] for r in sel], [r["commit_s"] for r in sel]
        print(f"| {ttl:g} | {len(sel)} | {statistics.median(ls):.2f}, {max(ls):.2f} | {statistics.median(cs):.2f}, {max(cs):.2f} "
              f"| {statistics.median(r['round_s'] for r in sel):.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
