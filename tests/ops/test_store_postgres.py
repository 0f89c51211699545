"""The run store on a real PostgreSQL server (started on 127.0.0.1 by the
`postgres_url` fixture; skipped with the reason printed where none can run)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import sqlalchemy as sa
import torch

from fleetlearn.ops import RunStore, StoreError
from fleetlearn.records import ClientRecord, RoundRecord


def _schema(url: str) -> dict:
    eng = sa.create_engine(url)
    insp = sa.inspect(eng)
    out = {t: sorted((c["name"], type(c["type"]).__name__ in ("JSON", "JSONB", "TEXT")) for c in insp.get_columns(t)) for t in ("runs", "rounds", "checkpoints")}
    eng.dispose()
    return out


def test_a_run_store_on_postgres_commits_reads_back_and_has_the_sqlite_schema(postgres_url, tmp_path):
    store = RunStore.create(tmp_path / "runs", "seed = 1\n", "abc", name="pg", url=postgres_url)
    assert (store.run_dir / "store_url").read_text() == postgres_url
    params = torch.arange(10, dtype=torch.float32)
    rec = RoundRecord(round=1, version=1, parent_version=0, accuracy=0.5, clients=[ClientRecord(3, "accepted", num_examples=7)])
    store.commit_round(rec, params, {"m": torch.ones(10)})
    store.commit_round(RoundRecord(round=2, version=1, status="failed", reason="x"))
    again = RunStore.open(store.run_dir)  # reads the URL back from the run directory
    recs = again.records()
    assert [(r.round, r.status) for r in recs] == [(1, "ok"), (2, "failed")]
    assert recs[0].clients[0].num_examples == 7 and recs[0].accuracy == 0.5
    version, loaded, state = again.load_checkpoint()
    assert version == 1 and torch.equal(loaded, params) and torch.equal(state["m"], torch.ones(10))
    assert again.info()["rounds_done"] == 2
    sqlite = RunStore.create(tmp_path / "runs", "seed = 1\n", "abc")
    assert _schema(postgres_url).keys() == _schema(f"sqlite:///{sqlite.run_dir / 'run.db'}").keys()
    assert [n for n, _ in _schema(postgres_url)["rounds"]] == [n for n, _ in _schema(f"sqlite:///{sqlite.run_dir / 'run.db'}")["rounds"]]


def test_an_unreachable_database_is_a_clear_error_and_leaves_no_run_directory(tmp_path):
    with pytest.raises(StoreError, match=r"cannot open the run store at postgresql://nobody:\*\*\*@127.0.0.1:1/x"):
        RunStore.create(tmp_path / "runs", "", "h", url="postgresql://nobody:secret@127.0.0.1:1/x")
    assert not any((tmp_path / "runs").iterdir())


def test_fleetlearn_run_with_store_flag_writes_to_postgres(postgres_url, tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "fleetlearn", "run", "--store", postgres_url, "--runs-dir", str(tmp_path / "runs"), "--quiet", "--json",
         "--set", "server.rounds=2", "--set", "server.cohort=5", "--set", "client.local_epochs=1"],
        capture_output=True, text=True, timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    run_dir = tmp_path / "runs" / summary["run_id"]
    assert not (run_dir / "run.db").exists()  # the database is the server's, not a file
    eng = sa.create_engine(postgres_url)
    with eng.connect() as conn:
        rows = conn.execute(sa.text("select round, status from rounds where run_id = :r order by round"), {"r": summary["run_id"]}).all()
    eng.dispose()
    assert [tuple(r) for r in rows] == [(1, "ok"), (2, "ok")]
    assert RunStore.open(run_dir).info()["status"] == "finished"
