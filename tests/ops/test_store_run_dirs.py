"""Run directories that went wrong: an emptied or damaged database, a deleted checkpoint,
two writers of one run, side files read while they are replaced.  Real SQLite files and
real safetensors checkpoints."""

import hashlib
import json
import os
import re
import sqlite3

import pytest
import torch

from fleetlearn.ops import ModelRegistry, RunStore, StoreError
from fleetlearn.records import RoundRecord


def _run(tmp_path, rounds=2):
    s = RunStore.create(tmp_path, "seed = 0\n", "abc", name="t")
    for r in range(1, rounds + 1):
        s.commit_round(RoundRecord(round=r, version=r, parent_version=r - 1, accuracy=0.5 + r / 100), torch.full((4,), float(r)))
    return s


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def damage_tables(db, *tables):
    """Overwrite the root page of each table with garbage (a damaged database page)."""
    with sqlite3.connect(db) as conn:
        page = conn.execute("pragma page_size").fetchone()[0]
        roots = [conn.execute("select rootpage from sqlite_master where type = 'table' and name = ?", (t,)).fetchone()[0] for t in tables]
    conn.close()
    data = bytearray(db.read_bytes())
    for root in roots:
        assert root > 1
        data[(root - 1) * page: root * page] = b"\xa5" * page
    db.write_bytes(bytes(data))


def test_an_emptied_run_db_is_refused_not_treated_as_a_new_store(tmp_path):
    s = _run(tmp_path)
    s.close()
    ckpt = s.run_dir / "checkpoints" / "v000002.safetensors"
    before = _sha(ckpt)
    db = s.run_dir / "run.db"
    db.write_bytes(b"")
    with pytest.raises(StoreError, match=re.escape(str(db)) + r" is an empty file: .*cannot be resumed"):
        RunStore.open(s.run_dir)
    with pytest.raises(StoreError, match="empty file"):
        RunStore.open(s.run_dir, lock=True)
    assert db.stat().st_size == 0  # not initialised as a new store
    assert _sha(ckpt) == before


def test_a_database_that_lost_the_run_row_is_refused(tmp_path):
    s = _run(tmp_path)
    s.close()
    with sqlite3.connect(s.run_dir / "run.db") as conn:
        conn.execute("delete from runs")
    conn.close()
    with pytest.raises(StoreError, match=f"has no row for run {s.run_id}: .*cannot be resumed"):
        RunStore.open(s.run_dir)


def test_a_deleted_latest_checkpoint_is_a_clear_error_naming_the_file(tmp_path):
    s = _run(tmp_path)
    path = s.run_dir / s.checkpoint_rows()[-1]["path"]
    path.unlink()
    with pytest.raises(StoreError, match=f"checkpoint v2 of run {s.run_id} is missing: {re.escape(str(path))}"):
        s.load_checkpoint()
    with pytest.raises(StoreError, match=f"is missing: {re.escape(str(path))}"):
        s.load_client_states()
    with pytest.raises(StoreError, match="is missing"):
        ModelRegistry(s).export(2, tmp_path / "m.safetensors")
    assert s.load_checkpoint(1)[0] == 1  # the others are still there


def test_a_damaged_database_page_is_a_clear_error_naming_the_file(tmp_path):
    s = _run(tmp_path, rounds=3)
    s.close()
    db = s.run_dir / "run.db"
    damage_tables(db, "rounds", "model_versions")
    store = RunStore.open(s.run_dir)  # the run's row is intact
    where = re.escape(str(db.resolve()))
    with pytest.raises(StoreError, match=f"run store {where}: database disk image is malformed"):
        store.records()
    with pytest.raises(StoreError, match=f"run store {where}: .*malformed"):
        ModelRegistry(store).versions()
    assert store.load_checkpoint()[0] == 3  # what is not damaged still reads


def test_a_second_writer_of_a_committed_round_never_replaces_its_checkpoint(tmp_path):
    """The old race: two processes resume one run and both write round 2's checkpoint.  The
    one whose round committed keeps its file, byte for byte; the loser leaves nothing."""
    s = _run(tmp_path)
    path = s.run_dir / s.checkpoint_rows()[-1]["path"]
    before = path.read_bytes()
    other = RunStore.open(s.run_dir)  # a second writer that never took the lock
    with pytest.raises(Exception):
        other.commit_round(RoundRecord(round=2, version=2, parent_version=1), torch.full((4,), 99.0))
    assert path.read_bytes() == before
    v, params, _ = s.load_checkpoint()
    assert v == 2 and torch.equal(params, torch.full((4,), 2.0))
    assert sorted(p.name for p in (s.run_dir / "checkpoints").iterdir()) == ["v000001.safetensors", "v000002.safetensors"]


def test_a_version_checkpointed_again_gets_a_new_file_and_the_old_one_goes_after_the_commit(tmp_path):
    s = _run(tmp_path)
    old = s.run_dir / s.checkpoint_rows()[-1]["path"]
    # A guardrail rolled round 3 back to version 2: its checkpoint is written again.
    s.commit_round(RoundRecord(round=3, version=2, parent_version=2, status="rolled_back"), torch.full((4,), 2.0), {"m": torch.ones(1)})
    row = s.checkpoint_rows()[-1]
    assert row["version"] == 2 and row["path"] != "checkpoints/v000002.safetensors"
    assert not old.exists()
    v, params, state = s.load_checkpoint()
    assert v == 2 and torch.equal(state["m"], torch.ones(1))


def test_one_process_at_a_time_trains_a_run(tmp_path):
    s = _run(tmp_path)  # create() holds the run's lock
    assert (s.run_dir / ".lock").read_text().strip() == str(os.getpid())
    with pytest.raises(StoreError, match=rf"run {s.run_id} is in use by another process \(pid {os.getpid()}"):
        RunStore.open(s.run_dir, lock=True)
    RunStore.open(s.run_dir).records()  # readers take no lock
    s.close()
    again = RunStore.open(s.run_dir, lock=True)
    again.close()


def test_taking_the_lock_removes_what_a_crashed_writer_left(tmp_path):
    s = _run(tmp_path)
    s.close()
    folder = s.run_dir / "checkpoints"
    (folder / "v000003.safetensors").write_bytes(b"renamed, never committed")
    (folder / ".v000003.safetensors.4242-abcd.tmp").write_bytes(b"half")
    store = RunStore.open(s.run_dir, lock=True)
    assert sorted(p.name for p in folder.iterdir()) == ["v000001.safetensors", "v000002.safetensors"]
    assert store.load_checkpoint()[0] == 2
    store.close()


def test_side_files_are_replaced_whole_never_rewritten_in_place(tmp_path):
    """A reader that opened summary.json, config.toml or param_spec.json before a write still
    reads the whole old file: the new one was written aside and renamed over it."""
    s = _run(tmp_path)
    s.finish({"final_accuracy": 0.1})
    s.write_text("param_spec.json", json.dumps({"v": 1}))
    with open(s.run_dir / "summary.json") as summary, open(s.run_dir / "param_spec.json") as spec, open(s.run_dir / "config.toml") as config:
        s.finish({"final_accuracy": 0.2})
        s.write_text("param_spec.json", json.dumps({"v": 2}))
        assert json.load(summary) == {"final_accuracy": 0.1}
        assert json.load(spec) == {"v": 1}
        s.record_resume_overrides({"server.rounds": (2, 5)}, 3, "seed = 0\n[server]\nrounds = 5\n")
        assert config.read() == "seed = 0\n"
    assert json.loads((s.run_dir / "summary.json").read_text()) == {"final_accuracy": 0.2}
    assert not [p.name for p in s.run_dir.iterdir() if p.name.endswith(".tmp")]


def test_resume_overrides_are_recorded_with_the_round_they_apply_from(tmp_path):
    s = _run(tmp_path)
    s.record_resume_overrides({"server.rounds": (2, 5), "engine.threads": ("auto", 2)}, 3, "seed = 0\n[server]\nrounds = 5\n")
    again = RunStore.open(s.run_dir)
    got = [{k: o[k] for k in ("round", "key", "old", "new")} for o in again.resume_overrides()]
    assert got == [{"round": 3, "key": "server.rounds", "old": 2, "new": 5}, {"round": 3, "key": "engine.threads", "old": "auto", "new": 2}]
    assert (s.run_dir / "config.toml").read_text() == again.info()["config_toml"] == "seed = 0\n[server]\nrounds = 5\n"
    assert again.info()["config_hash"] == "abc"  # the configuration that trained the model


def test_a_read_only_store_from_before_the_registry_is_read_not_written(tmp_path):
    """A store that predates some tables, opened read-only (SQLite's own mode=ro, binding
    whoever runs it): its versions are derived, reading works, tagging is a clear error."""
    s = _run(tmp_path)
    s.close()
    db = s.run_dir / "run.db"
    with sqlite3.connect(db) as conn:
        for table in ("model_tags", "model_versions", "privacy_ledger", "resume_overrides"):
            conn.execute(f"drop table {table}")
    conn.close()
    store = RunStore.open(s.run_dir, url=f"sqlite:///file:{db}?mode=ro&uri=true")
    assert [r.round for r in store.records()] == [1, 2] and store.resume_overrides() == [] and store.privacy_state(2) is None
    reg = ModelRegistry(store)
    assert [v.version for v in reg.versions()] == [1, 2] and reg.production() is None and reg.tag_history() == []
    with pytest.raises(StoreError, match="read-only and predates the model registry"):
        reg.promote(2)
    with pytest.raises(StoreError, match=r"attempt to write a readonly database \(the run directory or its database is read-only"):
        store.check_writable()
