"""Adaptive compression: the least lossy level whose upload fits, per client, vectorised."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fleetlearn.compression import AdaptiveCompression, choose_levels, estimate_bytes, parse_chain
from fleetlearn.devices.profiles import DeviceProfile

LADDER = ["none", "q8", "q4", "topk:0.1 | q8", "topk:0.01 | q8"]
DIM = 1_000_000


def naive(level_bytes, mbps, lat, budget):
    out = []
    for m, l, b in zip(mbps, lat, budget):
        fit = [j for j, nb in enumerate(level_bytes) if l + nb * 8 / (m * 1e6) <= b]
        out.append(fit[0] if fit else len(level_bytes) - 1)
    return np.array(out)


@given(
    mbps=hnp.arrays(np.float64, 40, elements=st.floats(0.01, 1000)),
    lat=hnp.arrays(np.float64, 40, elements=st.floats(0, 0.5)),
    budget=hnp.arrays(np.float64, 40, elements=st.floats(0, 30)),
)
@settings(max_examples=50, deadline=None)
def test_vectorised_choice_equals_the_definition(mbps, lat, budget):
    policy = AdaptiveCompression(LADDER, DIM)
    plan = policy.plan(mbps, lat, budget)
    assert np.array_equal(plan.levels, naive(policy.level_bytes, mbps, lat, budget))
    # a fitting level really fits, and the level before it (less lossy) does not
    secs = lat + policy.level_bytes[plan.levels] * 8 / (mbps * 1e6)
    assert np.allclose(plan.upload_s, secs)
    assert np.all(plan.upload_s[plan.fits] <= budget[plan.fits])
    prev = np.maximum(plan.levels - 1, 0)
    worse = plan.fits & (plan.levels > 0)
    assert np.all(lat[worse] + policy.level_bytes[prev[worse]] * 8 / (mbps[worse] * 1e6) > budget[worse])
    assert np.all(plan.levels[~plan.fits] == len(LADDER) - 1)


def test_matches_the_device_profile_upload_time():
    policy = AdaptiveCompression(LADDER, DIM)
    prof = DeviceProfile(compute_sps=1000, uplink_mbps=8.0, downlink_mbps=50, latency_s=0.05)
    for j, nb in enumerate(policy.level_bytes):
        budget = prof.upload_seconds(int(nb))
        assert policy.choose(prof.uplink_mbps, prof.latency_s, budget)[0] == j


def test_more_bandwidth_never_means_more_compression():
    policy = AdaptiveCompression(LADDER, DIM)
    mbps = np.geomspace(0.01, 1000, 500)
    levels = policy.choose(mbps, 0.05, 2.0)
    assert np.all(np.diff(levels) <= 0)
    assert levels[0] == len(LADDER) - 1 and levels[-1] == 0
    assert set(levels) == set(range(len(LADDER)))


def test_level_bytes_are_estimates_that_bound_real_payloads():
    policy = AdaptiveCompression(LADDER, 50_000)
    v = np.random.default_rng(0).standard_normal(50_000).astype(np.float32)
    import torch

    for chain, nb in zip(policy.chains, policy.level_bytes):
        assert len(chain.encode(torch.from_numpy(v), None)[0]) <= nb
        assert nb == estimate_bytes(chain.spec, 50_000)
    assert policy.ladder == [parse_chain(s).spec for s in LADDER]


def test_measured_sizes_can_replace_the_estimates():
    policy = AdaptiveCompression(["none", "topk:0.01"], 1000, level_bytes=[4013, 60])
    assert policy.choose([0.001], [0.0], [1.0])[0] == 1
    with pytest.raises(ValueError, match="2 levels"):
        AdaptiveCompression(["none", "q8"], 10, level_bytes=[1])


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(uplink_mbps=[0.0], latency_s=0.0, budget_s=1.0), "uplink_mbps"),
        (dict(uplink_mbps=[np.nan], latency_s=0.0, budget_s=1.0), "uplink_mbps"),
        (dict(uplink_mbps=[1.0], latency_s=-1.0, budget_s=1.0), "latency_s"),
        (dict(uplink_mbps=[1.0], latency_s=0.0, budget_s=np.nan), "budget_s"),
        (dict(uplink_mbps=[1.0, 2.0], latency_s=[0.0, 0.1, 0.2], budget_s=1.0), "broadcast|shape"),
    ],
)
def test_bad_inputs_are_refused(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        choose_levels([100, 10], **kwargs)


def test_empty_ladder_and_bad_chain_are_refused():
    with pytest.raises(ValueError, match="at least one"):
        AdaptiveCompression([], 10)
    with pytest.raises(ValueError, match="unknown codec 'q3'"):
        AdaptiveCompression(["none", "q3"], 10)


def test_empty_cohort():
    plan = AdaptiveCompression(LADDER, DIM).plan(np.array([]), np.array([]), np.array([]))
    assert plan.levels.shape == (0,) and plan.fits.shape == (0,)


# -- the `pace` policy ----------------------------------------------------------------------
def naive_pace(level_bytes, mbps, lat, before, wait_for, slack, deadline=None):
    up = lambda i, nb: lat[i] + nb * 8 / (mbps[i] * 1e6)
    t_min = sorted(before[i] + up(i, min(level_bytes)) for i in range(len(mbps)))
    T = (1 + slack) * t_min[min(wait_for, len(mbps)) - 1]
    if deadline is not None:
        T = min(T, deadline)
    out = []
    for i in range(len(mbps)):
        fit = [j for j, nb in enumerate(level_bytes) if before[i] + up(i, nb) <= T]
        out.append(fit[0] if fit else len(level_bytes) - 1)
    return np.array(out), T


@given(
    mbps=hnp.arrays(np.float64, 30, elements=st.floats(0.05, 500)),
    lat=hnp.arrays(np.float64, 30, elements=st.floats(0, 0.3)),
    before=hnp.arrays(np.float64, 30, elements=st.floats(0, 5)),
    wait_for=st.integers(1, 40),
    slack=st.sampled_from([0.0, 0.1, 0.5]),
    deadline=st.sampled_from([None, 0.5, 3.0]),
)
@settings(max_examples=60, deadline=None)
def test_pace_equals_its_definition(mbps, lat, before, wait_for, slack, deadline):
    policy = AdaptiveCompression(LADDER, DIM)
    plan = policy.pace(mbps, lat, before, wait_for, slack, deadline)
    want, T = naive_pace(policy.level_bytes, mbps, lat, before, wait_for, slack, deadline)
    assert np.array_equal(plan.levels, want)
    finish = before + plan.upload_s
    assert np.all(finish[plan.fits] <= T * (1 + 1e-12))
    if deadline is None:
        # the round's `wait_for`-th reply can arrive by T: at least that many clients fit
        assert plan.fits.sum() >= min(wait_for, len(mbps))


def test_pace_gives_slow_links_the_aggressive_rungs_and_fast_links_precision():
    policy = AdaptiveCompression(LADDER, DIM)
    mbps = np.geomspace(0.5, 5000, 200)
    levels = policy.pace(mbps, 0.05, 0.3, wait_for=100, slack=0.1).levels
    assert np.all(np.diff(levels) <= 0)  # more bandwidth, never more compression
    assert levels[0] == len(LADDER) - 1 and levels[-1] == 0
    # more slack never makes a client more lossy
    more = policy.pace(mbps, 0.05, 0.3, wait_for=100, slack=0.5).levels
    assert np.all(more <= levels) and more.sum() < levels.sum()


def test_pace_target_is_the_cohort_th_earliest_finish():
    # Four clients at 1 Mbit/s; the round waits for two.  'none' uploads in 32.1 ms, topk:10 in < 1 ms.
    policy = AdaptiveCompression(["none", "topk:10"], 1000)
    assert policy.level_bytes[0] == 4013 and policy.level_bytes[1] == 103
    before = np.array([0.1, 0.19, 0.3, 1.0])
    plan = policy.pace(np.full(4, 1.0), 0.0, before, wait_for=2, slack=0.0)
    # T = 0.19 + topk upload: client 0 still has time for float32, client 1 only for top-k,
    # clients 2 and 3 cannot make T at all (last rung, not fitting).
    assert list(plan.levels) == [0, 1, 1, 1] and list(plan.fits) == [True, True, False, False]
    assert np.allclose(plan.upload_s, policy.level_bytes[plan.levels] * 8 / 1e6)
    # 20 % slack: T = 0.229 s, enough for client 1 to send float32 (0.19 + 0.032 = 0.222 s)
    assert list(policy.pace(np.full(4, 1.0), 0.0, before, wait_for=2, slack=0.2).levels) == [0, 0, 1, 1]
    # the deadline caps T: nobody but client 0 (with top-k) finishes by 0.101 s
    capped = policy.pace(np.full(4, 1.0), 0.0, before, wait_for=2, slack=0.2, deadline_s=0.101)
    assert list(capped.levels) == [1, 1, 1, 1] and list(capped.fits) == [True, False, False, False]


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(wait_for=0), "wait_for"),
        (dict(wait_for=2.5), "wait_for"),
        (dict(slack=-0.1), "slack"),
        (dict(slack=float("nan")), "slack"),
        (dict(deadline_s=0.0), "deadline_s"),
        (dict(before_s=[np.nan, 0.1]), "before_s"),
        (dict(before_s=[-1.0, 0.1]), "before_s"),
    ],
)
def test_pace_refuses_bad_inputs(kwargs, msg):
    args = dict(uplink_mbps=[1.0, 2.0], latency_s=0.0, before_s=[0.1, 0.2], wait_for=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=msg):
        AdaptiveCompression(["none", "q8"], 100).pace(**args)


def test_pace_on_an_empty_cohort():
    plan = AdaptiveCompression(LADDER, DIM).pace(np.array([]), np.array([]), np.array([]), wait_for=3)
    assert plan.levels.shape == (0,)


def test_plan_task_reads_the_policy_from_the_task_spec_entry():
    from fleetlearn.task_spec import AdaptiveEntry

    policy = AdaptiveCompression(["none", "q8", "topk:0.01 | q8"], 10_000)
    mbps, lat, before = np.array([100.0, 1.0, 0.1]), np.array([0.01, 0.01, 0.01]), np.array([0.2, 0.3, 0.5])
    pace = AdaptiveEntry(policy="pace", wait_for=2, slack=0.05)
    assert np.array_equal(policy.plan_task(pace, mbps, lat, before).levels, policy.pace(mbps, lat, before, 2, 0.05).levels)
    fixed = AdaptiveEntry(policy="upload_budget", upload_budget_s=0.1)
    assert np.array_equal(policy.plan_task(fixed, mbps, lat, before).levels, policy.choose(mbps, lat, 0.1))
    # A deadline budget leaves each client the deadline minus its download and compute time.
    deadline = AdaptiveEntry(policy="upload_budget", upload_budget_s=0.6, budget_is_deadline=True)
    assert np.array_equal(policy.plan_task(deadline, mbps, lat, before).levels, policy.choose(mbps, lat, 0.6 - before))
    assert policy.plan_task(AdaptiveEntry(policy="upload_budget"), mbps, lat, before) is None  # no budget: the run's chain
    assert policy.plan_task(None, mbps, lat, before) is None  # the round has no adaptive entry


def test_the_default_ladder_parses_and_shrinks_rung_by_rung():
    from fleetlearn.config import CompressionConfig

    ladder = CompressionConfig().ladder
    sizes = [parse_chain(c).estimate_bytes(101_770) for c in ladder]  # the Fashion-MNIST MLP it was measured on
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    assert ladder[0] == "none" and parse_chain(ladder[-1]).ef  # the sparse last rung keeps what it drops
