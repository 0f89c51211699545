"""RunSummary helpers."""

from __future__ import annotations

import math

from fleetlearn.records import RoundRecord, RunSummary


def _summary(accuracies, seconds):
    records = [RoundRecord(round=i + 1, version=i + 1, accuracy=a, sim_seconds=s) for i, (a, s) in enumerate(zip(accuracies, seconds))]
    return RunSummary(run_id="r", run_dir="", rounds=len(records), final_accuracy=accuracies[-1], best_accuracy=max(accuracies),
                      final_loss=0.0, uplink_bytes=0, downlink_bytes=0, compression_ratio=1.0, sim_seconds=sum(seconds),
                      wall_seconds=0.0, records=records)


def test_seconds_to_counts_every_round_up_to_the_first_that_reaches_the_target():
    s = _summary([0.5, math.nan, 0.8, 0.7, 0.9], [1.0, 2.0, 0.5, 1.0, 1.0])
    assert s.seconds_to(0.8) == 3.5  # rounds 1-3, the unevaluated round 2 included
    assert s.seconds_to(0.85) == 5.5
    assert s.seconds_to(0.5) == 1.0
    assert s.seconds_to(0.95) == math.inf


def test_a_record_survives_the_stores_strict_json():
    import json

    import numpy as np

    from fleetlearn.records import ClientRecord

    clients = [
        ClientRecord(3, "accepted", num_examples=7, weight=0.25, loss_before=math.nan, arrival_s=math.inf, label_counts=[1, 0, 6]),
        ClientRecord(1, "rejected", "finite: non-finite", update_norm=-math.inf, codec="q8"),
    ]
    rec = RoundRecord(round=4, version=3, accuracy=math.nan, loss=np.float64(0.5), clients=clients,
                      extra={"x": [1.0, math.inf], "y": {"z": np.float64(math.nan)}, "t": (1, 2)})
    row = json.loads(json.dumps(rec.to_dict(), allow_nan=False))  # strict JSON: what the store's column holds
    back = RoundRecord.from_dict(row)
    assert [c.client_id for c in back.clients] == [3, 1] and back.clients[0].label_counts == [1, 0, 6]
    assert math.isnan(back.clients[0].loss_before) and back.clients[0].arrival_s == math.inf
    assert back.clients[1].update_norm == -math.inf and back.clients[1].reason == "finite: non-finite"
    assert back.clients[1].label_counts is None and back.clients[0].weight == 0.25
    assert math.isnan(back.accuracy) and back.loss == 0.5
    assert row["extra"] == {"x": [1.0, "inf"], "y": {"z": None}, "t": [1, 2]}  # nested values: None / "inf" (read with `num`)


def test_the_stores_compact_rows_are_columns_without_all_default_ones_and_read_back_whole():
    import json

    from fleetlearn.records import ClientRecord

    clients = [ClientRecord(3, "accepted", num_examples=7, loss_before=0.5, width=0.5, cluster=0, arrival_s=math.inf),
               ClientRecord(4, "dropped", "dropout: gone", accuracy=math.nan, label_counts=[2, 0], update_norm=math.nan)]
    rec = RoundRecord(round=2, version=2, clients=clients)
    row = json.loads(json.dumps(rec.to_dict(compact=True), allow_nan=False))
    cols = row["clients"]["columns"]
    # Only the columns where some client differs from the default; NaN / inf as in every row.
    assert set(cols) == {"client_id", "status", "reason", "num_examples", "arrival_s", "loss_before", "width", "label_counts", "cluster"}
    assert cols["client_id"] == [3, 4] and cols["arrival_s"] == ["inf", None] and cols["label_counts"] == [None, [2, 0]]
    assert cols["loss_before"] == [0.5, None] and cols["width"] == [0.5, 1.0]
    back = RoundRecord.from_dict(row)
    full = RoundRecord.from_dict(json.loads(json.dumps(rec.to_dict(), allow_nan=False)))
    assert repr(back.clients) == repr(full.clients) == repr(clients)  # repr: NaN fields compare as text
    assert len(rec.to_dict()["clients"][0]) == len(ClientRecord.__dataclass_fields__)  # the full form keeps every field
    assert RoundRecord.from_dict(json.loads(json.dumps(RoundRecord(round=1, version=1).to_dict(compact=True)))).clients == []


def test_rows_written_before_the_columns_still_read_back():
    # The store's earlier compact form: one dict per client, default-valued fields left out.
    old = {"round": 5, "version": 5, "clients": [{"client_id": 9, "status": "accepted", "num_examples": 3, "arrival_s": "inf"},
                                                 {"client_id": 2, "status": "dropped", "reason": "gone"}]}
    back = RoundRecord.from_dict(old)
    assert [(c.client_id, c.status, c.num_examples, c.reason) for c in back.clients] == [(9, "accepted", 3, ""), (2, "dropped", 0, "gone")]
    assert back.clients[0].arrival_s == math.inf and math.isnan(back.clients[1].loss_before)
