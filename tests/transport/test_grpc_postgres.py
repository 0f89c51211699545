"""`fleetlearn server --store postgresql://...`: a real server, three real clients,
the run store on a real PostgreSQL (the `postgres_url` fixture); kill -9 the
server mid-run and `--resume` it from the PostgreSQL store."""

from __future__ import annotations

import signal
import time

import pytest
import sqlalchemy as sa
from test_grpc_end_to_end import finish, free_port, setup, start_clients, start_server

from fleetlearn.ops import RunStore

pytestmark = pytest.mark.slow


def _committed(url: str) -> dict[str, int]:
    eng = sa.create_engine(url)
    try:
        with eng.connect() as conn:
            return {r: n for r, n in conn.execute(sa.text("select run_id, count(*) from rounds group by run_id")).all()}
    except sa.exc.ProgrammingError:  # tables not created yet
        return {}
    finally:
        eng.dispose()


def test_server_on_postgres_survives_kill_9_and_resumes_from_it(postgres_url, tmp_path):
    rounds = 4
    tokens = setup(tmp_path, rounds)
    port = free_port()
    before = _committed(postgres_url)
    server = start_server(tmp_path, port, str(tmp_path / "run.toml"), "--store", postgres_url)
    clients = start_clients(tmp_path, port, tokens)
    deadline = time.time() + 600
    new: dict[str, int] = {}
    while time.time() < deadline:
        new = {r: n for r, n in _committed(postgres_url).items() if r not in before}
        if new and max(new.values()) >= 2:
            break
        if server.poll() is not None:
            raise AssertionError(server.communicate()[1][-3000:])
        time.sleep(0.1)
    server.send_signal(signal.SIGKILL)
    server.wait()
    (run_id, committed), = new.items()
    assert committed >= 2
    run_dir = tmp_path / "runs" / run_id
    assert not (run_dir / "run.db").exists() and (run_dir / "store_url").read_text() == postgres_url
    server = start_server(tmp_path, port, "--resume", str(run_dir))
    resumed = finish(server, clients)
    assert resumed["rounds"] == rounds and resumed["run_id"] == run_id
    recs = RunStore.open(run_dir).records()
    assert [r.round for r in recs] == list(range(1, rounds + 1))  # nothing lost, nothing repeated
    assert _committed(postgres_url)[run_id] == rounds
    assert resumed["final_accuracy"] > 0.5
