"""Per-client state in checkpoints: error-feedback residuals and SCAFFOLD's c_i are saved
with each checkpoint (the run directory's client_states.sqlite: the states changed since
the last checkpoint, before the round commits) and restored on resume, so a run
interrupted after round k and resumed ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import sqlite3

import pytest
import torch

from fleetlearn.client import ClientStateStore
from fleetlearn.config import load_config
from fleetlearn.engine import build_coordinator
from fleetlearn.ops import RunStore
from fleetlearn.ops.store import StoreError

torch.set_num_threads(1)


def config(tmp_path, **client):
    return load_config({
        "seed": 5,
        "data": {"dataset": "digits", "clients": 10, "alpha": 0.1},
        "model": {"hidden": [16]},
        "client": {"local_steps": 4, "batch_size": 8, "momentum": 0.0, **client},
        "server": {"rounds": 5, "cohort": 4},
        "compression": {"uplink": "ef | topk:0.1"},
        "monitoring": {"debug": False, "detectors": []},
        "store": {"root": str(tmp_path)},
    })


def interrupted_then_resumed(cfg, k: int, forget_client_states: bool = False):
    first = build_coordinator(cfg, store=True)
    for _ in range(k):
        first.run_round()
    run_dir = first.store.run_dir
    # The process dies after round k committed: close() waits for the background commit
    # under way (a real death stops that thread; this one would otherwise go on writing
    # and pruning while the resumed coordinator reads) and releases the run's lock.
    first.store.close()
    del first
    store = RunStore.open(run_dir)
    again = build_coordinator(cfg, store=store)
    assert again.resume() == k
    if forget_client_states:
        for c in again.client_states.clients():
            again.client_states.put(c, None)
    again.run()
    return again, run_dir


@pytest.mark.parametrize("objective", ["plain", "scaffold"])
def test_resumed_run_matches_an_uninterrupted_one(tmp_path, objective):
    cfg = config(tmp_path, objective=objective)
    whole = build_coordinator(cfg, store=True)
    whole.run()
    resumed, run_dir = interrupted_then_resumed(cfg, k=2)
    assert torch.equal(resumed.params, whole.params)
    assert resumed.server_state.keys() == whole.server_state.keys()
    for k in whole.server_state:
        assert torch.equal(resumed.server_state[k], whole.server_state[k])
    a, b = whole.client_states.state_dict(), resumed.client_states.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert any(n.endswith("ef.residual") for n in a)
    assert any(n.endswith("scaffold.c_i") for n in a) == (objective == "scaffold")
    # The states live in the run directory's state file, a row or two per client (the last
    # two checkpoints'), not in a side file that rewrites the whole population each round.
    assert not list((run_dir / "checkpoints").glob("clients-*"))
    with sqlite3.connect(str(run_dir / "client_states.sqlite")) as db:
        per = db.execute("SELECT client, COUNT(*), MAX(round) FROM state GROUP BY client").fetchall()
    assert {c for c, _, _ in per} == set(whole.client_states.clients())
    assert all(n <= 2 and last <= 5 for _, n, last in per)


def test_without_the_client_states_the_resumed_run_differs(tmp_path):
    """The control: what the saved residuals and c_i are for."""
    cfg = config(tmp_path, objective="scaffold")
    whole = build_coordinator(cfg, store=True)
    whole.run()
    resumed, _ = interrupted_then_resumed(cfg, k=2, forget_client_states=True)
    assert not torch.equal(resumed.params, whole.params)


def test_corrupted_client_states_are_refused_on_resume(tmp_path):
    cfg = config(tmp_path)
    first = build_coordinator(cfg, store=True)
    first.run_round()
    first.store.close()
    with sqlite3.connect(str(first.store.run_dir / "client_states.sqlite")) as db:
        client, data = db.execute("SELECT client, data FROM state LIMIT 1").fetchone()
        flipped = bytearray(data)
        flipped[-1] ^= 0xFF
        db.execute("UPDATE state SET data = ? WHERE client = ?", (bytes(flipped), client))
    again = build_coordinator(cfg, store=RunStore.open(first.store.run_dir))
    assert again.resume() == 1
    with pytest.raises(ValueError, match=f"client state of client {client} \\(round 1\\).*does not match its checksum"):
        again.client_states.get(client)


def test_a_side_file_from_before_the_state_store_is_still_resumed(tmp_path):
    # Side files of earlier builds held client/<id>/<key> tensors: they are put back.
    cfg = config(tmp_path)
    first = build_coordinator(cfg, store=True)
    first.run_round()
    first.store.flush()
    states = first.client_states.state_dict()
    assert states
    first.load_side_state({name: t + 1 for name, t in states.items()})
    got = first.client_states.state_dict()
    assert got.keys() == states.keys() and all(torch.equal(got[n], states[n] + 1) for n in states)
    first.store.close()
    with pytest.raises(StoreError, match="has no checkpoint for version 99"):
        RunStore.open(first.store.run_dir).load_client_states(99)


def test_state_dict_round_trip_and_bad_names():
    s = ClientStateStore()
    s.put(3, {"ef.residual": torch.arange(4.0), "rng.seed": torch.tensor(7, dtype=torch.int64)})
    s.put(11, {"scaffold.c_i": torch.ones(4)})
    t = ClientStateStore()
    t.load_state_dict(s.state_dict())
    assert t.clients() == [3, 11]
    assert torch.equal(t.get(3)["ef.residual"], torch.arange(4.0)) and int(t.get(3)["rng.seed"]) == 7
    with pytest.raises(ValueError, match="client/<id>/<key>"):
        t.load_state_dict({"params": torch.zeros(2)})
