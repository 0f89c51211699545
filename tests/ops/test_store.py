import math

import pytest
import torch

from fleetlearn.ops import RunStore, StoreError, list_runs
from fleetlearn.records import ClientRecord, RoundRecord


def _store(tmp_path, **kw):
    return RunStore.create(tmp_path, "seed = 0\n", "abc", name="t", **kw)


def test_rounds_and_checkpoints_round_trip(tmp_path):
    s = _store(tmp_path)
    for r in (1, 2):
        rec = RoundRecord(round=r, version=r, accuracy=0.5 + r / 10, loss=math.nan, clients=[ClientRecord(7, "accepted", weight=1.0)])
        rec.extra["note"] = {"x": [1, 2]}
        s.commit_round(rec, torch.full((5,), float(r)), {"m": torch.ones(2) * r})
    again = RunStore.open(s.run_id, tmp_path)
    recs = again.records()
    assert [r.round for r in recs] == [1, 2]
    assert recs[1].accuracy == pytest.approx(0.7) and math.isnan(recs[1].loss)
    assert recs[0].clients[0].client_id == 7 and recs[0].extra["note"] == {"x": [1, 2]}
    v, params, state = again.load_checkpoint()
    assert v == 2 and torch.equal(params, torch.full((5,), 2.0)) and torch.equal(state["m"], torch.ones(2) * 2)
    v1, p1, _ = again.load_checkpoint(1)
    assert v1 == 1 and torch.equal(p1, torch.ones(5))
    assert again.info()["rounds_done"] == 2


def test_a_record_reads_back_as_written_whatever_json_serializer_wrote_it(tmp_path):
    # The JSON columns are written by orjson, with the json module for what orjson refuses
    # (a 70-bit integer here): both read back the same values.
    s = _store(tmp_path)
    clients = [ClientRecord(c, "accepted", loss_before=math.inf if c == 2 else 0.25 * c, weight=1.0) for c in range(3)]
    rec = RoundRecord(round=1, version=1, accuracy=0.1 + 0.2, loss=-math.inf, clients=clients)
    rec.extra["by_id"] = {3: "three", "x": [1.5, None, True]}
    s.commit_round(rec)
    big = RoundRecord(round=2, version=2, accuracy=0.5, clients=clients)
    big.extra["seed"] = 2**70
    s.commit_round(big)
    got = RunStore.open(s.run_id, tmp_path).records()
    assert got[0].accuracy == 0.1 + 0.2 and got[0].loss == -math.inf  # every digit of the float
    assert got[0].extra["by_id"] == {"3": "three", "x": [1.5, None, True]}  # keys become strings, as JSON has them
    assert [c.loss_before for c in got[0].clients] == [0.0, 0.25, math.inf]
    assert got[1].extra["seed"] == 2**70


def test_a_corrupted_checkpoint_is_detected(tmp_path):
    s = _store(tmp_path)
    s.commit_round(RoundRecord(round=1, version=1), torch.zeros(10))
    path = s.run_dir / s.checkpoint_rows()[0]["path"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="corrupted"):
        s.load_checkpoint()


def test_a_failed_commit_leaves_no_half_round(tmp_path):
    s = _store(tmp_path)
    s.commit_round(RoundRecord(round=1, version=1), torch.zeros(3))
    with pytest.raises(Exception):
        s.commit_round(RoundRecord(round=1, version=2), torch.zeros(3))  # duplicate round: the insert fails
    assert [r.round for r in s.records()] == [1]
    assert [c["version"] for c in s.checkpoint_rows()] == [1]
    assert s.info()["rounds_done"] == 1


def test_list_and_open_errors(tmp_path):
    a = _store(tmp_path)
    a.finish({"final_accuracy": 0.9})
    items = list_runs(tmp_path)
    assert items[0]["run_id"] == a.run_id and items[0]["status"] == "finished" and items[0]["final_accuracy"] == 0.9
    with pytest.raises(StoreError, match="no run found"):
        RunStore.open("nope", tmp_path)
    assert list_runs(tmp_path / "missing") == []


def test_sqlalchemy_url_is_honoured(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    s = RunStore.create(tmp_path / "runs", "seed = 0\n", "h", url=url)
    s.commit_round(RoundRecord(round=1, version=1))
    assert (tmp_path / "shared.db").is_file() and not (s.run_dir / "run.db").exists()
    assert RunStore.open(s.run_dir).records()[0].round == 1
