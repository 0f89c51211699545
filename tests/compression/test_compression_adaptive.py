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
