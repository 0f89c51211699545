import math

import numpy as np
import pytest
import torch

from fleetlearn.config import ConfigError, load_config
from fleetlearn.engine import build_coordinator
from fleetlearn.engine.fedbuff import STALENESS_WEIGHTS


def conf(**server):
    # Identical speeds: uniform devices, and every client processes the same number of
    # examples (fixed steps of full batches), so all replies of a dispatch arrive together.
    return load_config({
        "data": {"clients": 30, "partition": "iid"},
        "server": {"rounds": 3, "cohort": 8, **server},
        "client": {"local_steps": 3, "batch_size": 4},
    })


def test_fedbuff_with_buffer_equal_concurrency_equal_cohort_is_fedavg():
    sync = build_coordinator(conf(), store=False)
    sync.run()
    fb = build_coordinator(conf(mode="async", concurrency=8, buffer_size=8, staleness_weight="sqrt"), store=False)
    fb.run()
    assert fb.round == sync.round == 3 and fb.version == 3
    assert torch.allclose(fb.params, sync.params, atol=1e-6)
    for a, b in zip(fb.records, sync.records):
        assert sorted(x.client_id for x in a.clients) == sorted(x.client_id for x in b.clients)
        assert a.extra["staleness_max"] == 0


def test_fedbuff_staleness_is_measured_and_bounded():
    c = build_coordinator(load_config({
        "data": {"clients": 40},
        "server": {"rounds": 8, "cohort": 4, "mode": "async", "concurrency": 12, "buffer_size": 4, "max_staleness": 2},
        "client": {"local_epochs": 1},
        "devices": {"profile": "mixed_fleet"},
    }), store=False)
    summary = c.run()
    assert summary.rounds == 8
    stale = [x for r in c.records for x in r.clients if x.staleness > 0]
    assert stale, "with concurrency > buffer some updates must be stale"
    refused = [x for r in c.records for x in r.clients if x.status == "rejected"]
    assert all("max_staleness is 2" in x.reason and x.staleness > 2 for x in refused)
    assert all(x.staleness <= 2 for r in c.records for x in r.clients if x.status == "accepted")
    assert summary.best_accuracy > 0.2  # learning (chance is 0.1) despite stale updates


def test_staleness_weights():
    s = np.array([0.0, 3.0])
    assert list(STALENESS_WEIGHTS["constant"](s)) == [1, 1]
    assert list(STALENESS_WEIGHTS["sqrt"](s)) == [1, 0.5]
    assert list(STALENESS_WEIGHTS["inverse"](s)) == [1, 0.25]


def test_async_with_all_dropouts_does_not_hang():
    c = build_coordinator(load_config({
        "data": {"clients": 20},
        "server": {"rounds": 2, "cohort": 4, "mode": "async"},
        "devices": {"dropout": 1.0},
    }), store=False)
    before = c.params.clone()
    s = c.run()
    assert s.rounds == 2 and s.failed_rounds == 2
    assert all("did not fill" in r.reason for r in c.records)
    assert torch.equal(c.params, before)


def test_fedbuff_refuses_differential_privacy_and_secure_aggregation():
    """Privacy is accounted per sampled synchronous round; an async run used to crash at its
    first aggregate (sampling rate 0) and, in local mode, never noised its clients' updates."""
    for privacy in ({"mode": "local"}, {"mode": "central"}, {"secure_aggregation": True}):
        raw = conf(mode="async", concurrency=8, buffer_size=8).model_dump()
        raw["privacy"] = {**raw["privacy"], **privacy}
        with pytest.raises(ConfigError, match="server.mode = 'async'"):
            load_config(raw)


def test_fedbuff_tasks_carry_the_synchronous_task_config():
    coord = build_coordinator(conf(mode="async", concurrency=8, buffer_size=8), store=False)
    seen = []
    dispatch = coord.transport.dispatch

    def spy(task, cohort):
        seen.append(task.spec)
        return dispatch(task, cohort)

    coord.transport.dispatch = spy
    coord.run()
    assert seen and all(spec == coord.task_spec((), None) for spec in seen)
    assert seen[0].seed == coord.config.seed and seen[0].partial_work == coord.config.server.partial_work  # async tasks once carried only the fit settings
