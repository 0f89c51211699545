import math

import numpy as np
import pytest
import torch

from fleetlearn.config import ConfigError, load_config
from fleetlearn.engine import build_coordinator
from fleetlearn.engine.fedbuff import STALENESS_WEIGHTS, StalenessStep


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


def test_adaptive_staleness_step_follows_the_delay_not_the_weight_shape():
    """Under server.staleness_step = 'adaptive' a steady stream of buffers with mean
    staleness 3 steps at server_lr / (1 + 3) on average whatever s(tau) is, and within a
    buffer a staler update still gets a smaller scale; 'fixed' is s(tau) as it is."""
    buf = np.array([0.0, 1.0, 3.0, 8.0])  # mean staleness 3
    for name in ("constant", "sqrt", "inverse"):
        rule = StalenessStep("adaptive", STALENESS_WEIGHTS[name])
        scales = [rule(buf) for _ in range(4)]
        for g in scales:
            assert np.allclose(g, scales[0])
            assert g.mean() == pytest.approx(1 / (1 + 3))
            if name != "constant":
                assert np.all(np.diff(g) < 0), f"{name}: staler updates must weigh less"
            assert np.allclose(g / g[0], STALENESS_WEIGHTS[name](buf))  # relative weights: s(tau)
    fixed = StalenessStep("fixed", STALENESS_WEIGHTS["sqrt"])
    assert np.allclose(fixed(buf), STALENESS_WEIGHTS["sqrt"](buf))
    fresh = StalenessStep("adaptive", STALENESS_WEIGHTS["inverse"])
    assert list(fresh(np.zeros(5))) == [1.0] * 5  # no staleness: FedAvg's step


def test_adaptive_staleness_step_in_a_run_and_after_resume():
    """The loop scales each step by the rule over every update aggregated before it:
    replaying the records gives each step's recorded mean scale, and a rule relearned from
    the first records (what resume does) continues exactly."""
    c = build_coordinator(load_config({
        "data": {"clients": 40},
        "server": {"rounds": 6, "cohort": 4, "mode": "async", "concurrency": 12, "buffer_size": 4},
        "client": {"local_steps": 2},
        "devices": {"profile": "mixed_fleet", "slow_fraction": 0.25},
    }), store=False)
    c.run()
    assert c.config.server.staleness_step == "adaptive"
    stal = [np.array([x.staleness for x in r.clients if x.status == "accepted"], dtype=np.float64) for r in c.records]
    assert any(s.max() > 0 for s in stal)
    replay = StalenessStep("adaptive", STALENESS_WEIGHTS["sqrt"])
    got = [float(replay(s).mean()) for s in stal]
    assert [r.extra["staleness_scale_mean"] for r in c.records] == pytest.approx(got)
    assert got[-1] < 1.0  # stale updates: smaller steps than FedAvg's
    resumed = StalenessStep("adaptive", STALENESS_WEIGHTS["sqrt"])
    resumed.relearn(c.records[:3])
    assert [float(resumed(s).mean()) for s in stal[3:]] == pytest.approx(got[3:])
    with pytest.raises(ConfigError, match="staleness_step"):
        load_config({"server": {"mode": "async", "staleness_step": "mean"}})


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


def _flaky(**server):
    return load_config({
        "data": {"clients": 40},
        "server": {"rounds": 6, "cohort": 4, "mode": "async", "concurrency": 12, "buffer_size": 4, **server},
        "client": {"local_epochs": 1},
        "devices": {"profile": "mixed_fleet", "dropout": 0.3},
    })


def test_a_fedbuff_task_has_the_runs_deadline_and_a_silent_device_frees_its_slot_then():
    """Without a deadline a device that went silent holds its slot until the heartbeat timeout
    (10 s); with `server.deadline_s` each task closes at its deadline, as a network server's
    task group does: the silent device is dropped then, by name, and its slot trains again."""
    slow = build_coordinator(_flaky(), store=False)
    s_slow = slow.run()
    fast = build_coordinator(_flaky(deadline_s=1.0), store=False)
    s_fast = fast.run()
    assert s_fast.rounds == s_slow.rounds == 6
    late = [x for r in fast.records for x in r.clients if x.status == "dropped" and "deadline" in x.reason]
    assert late and all(x.reason == "no update before the deadline of 1s" for x in late)
    assert all(x.arrival_s <= 1.0 for r in fast.records for x in r.clients if x.status == "accepted")
    assert all(r.deadline_s == 1.0 for r in fast.records)
    assert not any("deadline" in x.reason for r in slow.records for x in r.clients)
    # the silent devices' 10 s waits are gone: the same 6 steps take far less simulated time
    assert fast.records[-1].sim_start_s + fast.records[-1].sim_seconds < 0.5 * (slow.records[-1].sim_start_s + slow.records[-1].sim_seconds)


def test_fedbuffs_adaptive_deadline_follows_the_completion_times():
    c = build_coordinator(_flaky(deadline_policy="adaptive", deadline_quantile=0.9, deadline_margin=2.0), store=False)
    c.run()
    assert math.isnan(c.records[0].deadline_s)  # no history yet: the first tasks wait for all
    assert all(r.deadline_s > 0 and math.isfinite(r.deadline_s) for r in c.records[1:])
    done = [x.arrival_s for x in c.records[0].clients if x.status == "accepted"]
    assert c.records[1].deadline_s <= 2.0 * max(done) + 1e-9  # a quantile of what came, times the margin
