"""Label-skew helpers wired into the engine: client-side oversampling (`client.oversample`)
and aggregation weights from the clients' label histograms (`server.weighting =
"label_importance"`), both recorded per client per round."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fleetlearn.aggregation.weighting import label_importance
from fleetlearn.config import ConfigError, load_config
from fleetlearn.engine import build_coordinator
from fleetlearn.records import RoundRecord

torch.set_num_threads(1)


def coordinator(client=None, server=None):
    cfg = load_config({
        "seed": 2,
        "data": {"dataset": "digits", "clients": 15, "alpha": 0.1},
        "model": {"hidden": [16]},
        "client": {"local_epochs": 1, "batch_size": 8, **(client or {})},
        "server": {"rounds": 2, "cohort": 6, **(server or {})},
        "monitoring": {"debug": False, "detectors": []},
    })
    return build_coordinator(cfg, store=False)


def train_labels(coord, cid: int) -> np.ndarray:
    return coord.transport.client_data(cid).y.numpy()


def test_oversampling_is_recorded_per_client_and_keeps_the_claimed_count():
    coord = coordinator(client={"oversample": True})
    rec = coord.run_round()
    assert rec.accepted == 6
    for c in rec.clients:
        counts = np.bincount(train_labels(coord, c.client_id), minlength=10)
        present = counts[counts > 0]
        assert c.oversampled == int((present.max() - present).sum())  # copies up to the majority class
        assert c.num_examples == int(counts.sum())  # weights use the client's real count
        # One epoch over the balanced set: steps = ceil(balanced size / batch).
        assert c.steps == int(np.ceil(present.max() * present.size / 8))
    assert sum(c.oversampled for c in rec.clients) > 0  # Dirichlet(0.1) clients are skewed


def test_oversampling_changes_training_and_is_off_by_default():
    on, off = coordinator(client={"oversample": True}), coordinator()
    r_on, r_off = on.run_round(), off.run_round()
    assert all(c.oversampled == 0 for c in r_off.clients)
    assert "oversample" not in off.task_spec().entries and "oversample" in on.task_spec().entries
    assert not torch.allclose(on.params, off.params)


def test_label_importance_weights_come_from_the_clients_histograms():
    coord = coordinator(server={"weighting": "label_importance", "weighting_method": "multiplicative"})
    rec = coord.run_round()
    assert rec.status == "ok"
    acc = [c for c in rec.clients if c.status == "accepted"]
    hist = np.array([c.label_counts for c in acc])
    for c, h in zip(acc, hist):
        assert h.tolist() == np.bincount(train_labels(coord, c.client_id), minlength=10).tolist()
    again = RoundRecord.from_dict(rec.to_dict())  # what the run store writes and reads back
    assert [c.label_counts for c in again.clients] == [c.label_counts for c in rec.clients]
    want = label_importance(hist, "uniform", "multiplicative")
    got = np.array([c.weight for c in acc])
    assert np.allclose(got, want / want.sum(), atol=1e-9)
    # Not the example weights: the weighting part really read the histograms.
    ex = np.array([c.num_examples for c in acc], dtype=float)
    assert not np.allclose(got, ex / ex.sum(), atol=1e-3)
    # The balanced mixture's label distribution is closer to uniform than the pooled one.
    p = hist / hist.sum(1, keepdims=True)
    mix, pooled = got @ p, hist.sum(0) / hist.sum()
    assert np.abs(mix - 0.1).sum() < np.abs(pooled - 0.1).sum()


def test_histograms_are_only_requested_by_label_importance():
    coord = coordinator()
    rec = coord.run_round()
    assert "label_histogram" not in coord.task_spec().entries
    assert all(c.label_counts is None for c in rec.clients)
    assert all(c.label_counts is None for c in RoundRecord.from_dict(rec.to_dict()).clients)


@pytest.mark.parametrize("over", [{"client": {"oversample": True}}, {"server": {"weighting": "label_importance"}}])
def test_helpers_refuse_async_mode_and_run_over_grpc(over, tmp_path):
    base = {"data": {"clients": 15}, "server": {"cohort": 5}}
    for k, v in over.items():
        base[k] = {**base.get(k, {}), **v}
    with pytest.raises(ConfigError, match="synchronous rounds only"):
        load_config({**base, "server": {**base["server"], "mode": "async"}})
    pytest.importorskip("grpc")
    from fleetlearn.transport.grpc.commands import server_transport

    # Over gRPC the helpers travel (tests/transport/test_grpc_label_skew.py): the server starts.
    server_transport(load_config(base), spec=None, address="127.0.0.1:0", state_dir=tmp_path).close(grace_s=0.1)
