"""`ClientStateStore`: bounded memory over a SQLite file, checkpoints that survive a crash
between a round's state rows and its commit, and memory that does not grow with the
population (fleetlearn.client.state_store)."""

from __future__ import annotations

import pickle
import sqlite3

import pytest
import torch

from fleetlearn.client.state_store import ENTRY_BYTES, TENSOR_BYTES, ClientStateStore


def residual(c: int, v: float = 0.0, d: int = 250) -> dict[str, torch.Tensor]:
    return {"ef.residual": torch.full((d,), float(c) + v)}


ENTRY = ENTRY_BYTES + TENSOR_BYTES + 4 * 250  # one residual's entry


def rows(path) -> list[tuple[int, int, bool]]:
    with sqlite3.connect(str(path)) as db:
        return sorted((c, r, d is not None) for c, r, d in db.execute("SELECT client, round, data FROM state"))


def test_memory_stays_within_the_cap_and_every_state_comes_back():
    store = ClientStateStore(max_bytes=3 * ENTRY)
    for c in range(20):
        store.put(c, residual(c))
        assert store.nbytes() <= 3 * ENTRY
    assert store.path is not None and store.path.is_file()  # a temporary file, made when first needed
    assert len(store) == 20 and store.clients() == list(range(20))
    for c in range(20):
        assert torch.equal(store.get(c)["ef.residual"], residual(c)["ef.residual"])
        assert store.nbytes() <= 3 * ENTRY
    path = store.path
    store.close()
    assert not path.exists()


def test_small_populations_never_touch_the_disk():
    store = ClientStateStore()
    for c in range(50):
        store.put(c, residual(c))
    assert store.path is None and len(store) == 50
    store.put(3, None)
    assert store.get(3) is None and len(store) == 49


def test_a_population_with_a_seed_each_stays_within_the_cap():
    # A codec seed and a byte-budget count are 16 bytes of data in a few hundred bytes of
    # objects: the cap counts those, so a population of them cannot outgrow it.
    cap = 1 << 20  # about a thousand such entries
    store = ClientStateStore(max_bytes=cap)
    seed = {"rng.seed": torch.tensor(7), "budget.k": torch.tensor(1200)}
    for c in range(50_000):
        store.put(c, seed)
    assert store.nbytes() <= cap
    assert int(store.get(0)["budget.k"]) == 1200 and int(store.get(49_999)["rng.seed"]) == 7
    store.close()


def test_a_crash_between_the_state_rows_and_the_rounds_commit_resumes_the_checkpoint(tmp_path):
    path = tmp_path / "client_states.sqlite"
    store = ClientStateStore(path, max_bytes=2 * ENTRY)
    for c in range(5):
        store.put(c, residual(c))
    store.checkpoint(1)  # round 1 committed
    # Round 2: clients 0 and 1 change, 5 appears, 4 loses its state; the memory holds two,
    # so some of these are written out as rows of round 2 before any checkpoint.
    store.put(0, residual(0, 0.5))
    store.put(1, residual(1, 0.5))
    store.put(5, residual(5))
    store.put(4, None)
    assert any(r == 2 for _, r, _ in rows(path))
    store.close()  # the process dies before round 2 commits
    again = ClientStateStore(path, max_bytes=2 * ENTRY)
    again.resume(1)
    assert all(r <= 1 for _, r, _ in rows(path))
    assert again.clients() == [0, 1, 2, 3, 4]
    assert torch.equal(again.get(0)["ef.residual"], residual(0)["ef.residual"])
    assert torch.equal(again.get(4)["ef.residual"], residual(4)["ef.residual"])
    assert again.get(5) is None


def test_checkpoints_keep_the_latest_committed_rows_and_prune_the_rest(tmp_path):
    path = tmp_path / "s.sqlite"
    store = ClientStateStore(path, max_bytes=ENTRY)
    for r in range(1, 6):
        for c in range(4):
            store.put(c, residual(c, r))
        store.put(9, residual(9, r) if r % 2 else None)
        store.checkpoint(r)
    # Round 4 is committed (the caller waited), round 5's rows may still be needed for it:
    # at most the two latest checkpoints' rows per client.
    per = {}
    for c, r, _ in rows(path):
        per.setdefault(c, []).append(r)
    assert all(len(v) <= 2 and max(v) == 5 for v in per.values())
    store.resume(4)  # the run store's last committed round
    assert [float(store.get(c)["ef.residual"][0]) for c in range(4)] == [c + 4.0 for c in range(4)]
    assert store.get(9) is None  # removed in round 4
    store.put(9, residual(9, 6))
    store.checkpoint(5)
    store.resume(5)
    assert float(store.get(9)["ef.residual"][0]) == 15.0


def test_a_store_travels_to_a_worker_as_its_states():
    store = ClientStateStore(max_bytes=ENTRY)
    for c in range(3):
        store.put(c, residual(c))
    copy = pickle.loads(pickle.dumps(store))
    assert copy.clients() == [0, 1, 2] and torch.equal(copy.get(2)["ef.residual"], residual(2)["ef.residual"])


def test_attach_keeps_what_was_held(tmp_path):
    store = ClientStateStore(max_bytes=ENTRY)
    for c in range(3):
        store.put(c, residual(c))
    held = store.nbytes()
    store.attach(tmp_path / "run.sqlite")
    assert store.nbytes() == held  # the states already pushed out are copied file to file, not loaded
    store.checkpoint(1)
    assert sorted(c for c, r, _ in rows(tmp_path / "run.sqlite") if r == 1) == [0, 1, 2]
    assert all(torch.equal(store.get(c)["ef.residual"], residual(c)["ef.residual"]) for c in range(3))


def test_attach_of_many_pushed_out_states_stays_within_memory(tmp_path):
    store = ClientStateStore(max_bytes=4 * ENTRY)
    for c in range(200):
        store.put(c, residual(c))
    store.put(5, None)  # a removal pushed out too: it must stay removed in the new file
    for c in range(200, 210):
        store.put(c, residual(c))
    before = store.nbytes()
    store.attach(tmp_path / "run.sqlite")
    assert store.nbytes() == before <= 4 * ENTRY
    assert store.clients() == [c for c in range(210) if c != 5]
    store.checkpoint(3)
    store.resume(3)  # the copied rows are part of checkpoint 3
    assert store.get(5) is None and store.clients() == [c for c in range(210) if c != 5]
    assert torch.equal(store.get(150)["ef.residual"], residual(150)["ef.residual"])


def test_a_file_that_is_not_a_state_file_is_refused(tmp_path):
    bad = tmp_path / "client_states.sqlite"
    bad.write_bytes(b"not a database at all" * 100)
    with pytest.raises(ValueError, match="is not a fleetlearn state file"):
        ClientStateStore(bad)
    with pytest.raises(ValueError, match="max_bytes must be >= 0"):
        ClientStateStore(max_bytes=-1)


def test_a_corrupted_state_row_is_refused_with_where_it_is(tmp_path):
    path = tmp_path / "s.sqlite"
    store = ClientStateStore(path)
    store.put(3, residual(3))
    store.checkpoint(1)
    store.close()
    with sqlite3.connect(str(path)) as db:
        (data,) = db.execute("SELECT data FROM state WHERE client = 3").fetchone()
        flipped = bytearray(data)
        flipped[-1] ^= 0x01  # one bit of one value: still readable safetensors, the wrong residual
        db.execute("UPDATE state SET data = ? WHERE client = 3", (bytes(flipped),))
    with pytest.raises(ValueError, match="client state of client 3 \\(round 1\\).*does not match its checksum"):
        ClientStateStore(path).get(3)
