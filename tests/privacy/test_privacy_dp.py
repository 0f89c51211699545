"""Clipping, Gaussian noise, adaptive clipping and local DP."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fleetlearn.privacy import (
    AdaptiveClipping,
    CentralDP,
    GaussianMechanism,
    LocalDP,
    SecureAggregation,
    central_noise,
    clip_updates,
    local_noise,
)


def _gen(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


# -- clipping ---------------------------------------------------------------------------
def test_clip_bounds_norms_and_keeps_small_rows_bit_exact():
    torch.manual_seed(0)
    m = torch.randn(50, 300)
    m[::2] *= 0.01  # half the rows are well within the bound
    clipped, norms = clip_updates(m, 1.5)
    assert torch.equal(norms, torch.linalg.vector_norm(m, dim=1))  # norms are BEFORE clipping
    out = torch.linalg.vector_norm(clipped, dim=1)
    assert bool((out <= 1.5 * (1 + 1e-6)).all())
    small = norms <= 1.5
    assert small.any() and (~small).any()
    assert torch.equal(clipped[small], m[small])
    # large rows keep their direction and land on the sphere of radius C
    big = ~small
    cos = torch.nn.functional.cosine_similarity(clipped[big], m[big], dim=1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-6)
    assert torch.allclose(out[big], torch.full_like(out[big], 1.5), rtol=1e-6)


def test_clip_numpy_in_numpy_out_and_zero_rows():
    m = np.zeros((3, 4), dtype=np.float32)
    m[1] = [3, 4, 0, 0]
    clipped, norms = clip_updates(m, 1.0)
    assert isinstance(clipped, np.ndarray)
    np.testing.assert_allclose(clipped[1], [0.6, 0.8, 0, 0], rtol=1e-6)
    assert np.array_equal(clipped[0], m[0]) and norms[0] == 0


@pytest.mark.parametrize("c", [0.0, -1.0, math.inf, math.nan])
def test_clip_rejects_bad_clip_norm(c):
    with pytest.raises(ValueError, match="clip_norm"):
        clip_updates(torch.ones(2, 2), c)


def test_clip_rejects_non_finite_rows():
    m = torch.ones(2, 3)
    m[0, 1] = math.nan
    with pytest.raises(ValueError, match="non-finite"):
        clip_updates(m, 1.0)


@settings(max_examples=40, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 8), st.integers(1, 16)), elements=st.floats(-1e6, 1e6, width=32)), st.floats(1e-3, 1e3))
def test_clip_property(m, c):
    clipped, norms = clip_updates(m, c)
    out = np.linalg.norm(clipped.astype(np.float64), axis=1)
    assert (out <= c * (1 + 1e-5)).all()
    small = norms <= c
    assert np.array_equal(clipped[small], m[small])


# -- Gaussian noise ---------------------------------------------------------------------
def test_central_noise_std_on_sum_divided_by_n():
    z, c, n, d = 1.3, 0.7, 10, 200_000
    total = torch.zeros(d, dtype=torch.float64)
    out = central_noise(total, c, z, n, _gen(0))
    emp = float((out * n).std())
    assert emp == pytest.approx(z * c, rel=0.01)
    assert abs(float(out.mean())) < 5 * z * c / n / math.sqrt(d)
    # "mean" form: same distribution, same draws -> same numbers
    via_mean = central_noise(total / n, c, z, n, _gen(0), of="mean")
    assert torch.allclose(out, via_mean, atol=1e-12)
    # reproducible with a fixed seed
    assert torch.equal(out, central_noise(total, c, z, n, _gen(0)))


def test_gaussian_mechanism_uses_fixed_denominator():
    mech = GaussianMechanism(noise_multiplier=0.0, expected_clients=8)
    total = torch.arange(5, dtype=torch.float64)
    assert torch.equal(mech(total, 1.0), total / 8)


def test_local_noise_clips_then_noises():
    v = torch.zeros(100_000, dtype=torch.float64)
    v[0] = 10.0  # norm 10, clipped to 2
    out = local_noise(v, 2.0, 0.5, _gen(1))
    noise = out.clone()
    noise[0] -= 2.0
    assert float(noise.std()) == pytest.approx(0.5 * 2.0, rel=0.01)
    assert float(noise[1:].mean()) == pytest.approx(0.0, abs=0.02)
    ldp = LocalDP(2.0, 0.5)
    assert torch.equal(ldp.apply(v, _gen(1)), out)
    g1, g2 = LocalDP.client_generator(0, 3, 7), LocalDP.client_generator(0, 3, 8)
    assert not torch.equal(torch.randn(5, generator=g1), torch.randn(5, generator=g2))


# -- central DP-FedAvg --------------------------------------------------------------------
def test_central_dp_without_noise_is_clipped_sum_over_expected_cohort():
    torch.manual_seed(2)
    u = torch.randn(7, 50) * torch.tensor([0.1, 5, 0.3, 2, 0.01, 8, 1]).unsqueeze(1)
    dp = CentralDP(noise_multiplier=0.0, clip_norm=1.0, expected_clients=10, seed=0)
    res = dp.aggregate(u)
    norms = torch.linalg.vector_norm(u, dim=1)
    expected = (u * torch.clamp(1.0 / norms, max=1.0).unsqueeze(1)).sum(0) / 10  # fixed denominator m = 10
    assert torch.allclose(res.mean, expected, atol=1e-6)
    assert res.clipped_fraction == pytest.approx(float((norms > 1).float().mean()))


def test_central_dp_noise_scale():
    u = torch.zeros(20, 100_000)
    dp = CentralDP(noise_multiplier=1.1, clip_norm=0.5, expected_clients=20, seed=3)
    res = dp.aggregate(u)
    assert float(res.mean.std()) == pytest.approx(1.1 * 0.5 / 20, rel=0.01)
    assert res.noise_std == pytest.approx(0.55)


def test_adaptive_noise_multiplier_formula_and_precondition():
    a = AdaptiveClipping(1.0, expected_clients=20, count_stddev=1.0)
    assert a.update_noise_multiplier(1.0) == pytest.approx(1 / math.sqrt(1 - 0.25))
    # composing z_Delta (sensitivity 1) with sigma_b (sensitivity 1/2) gives back z
    z_d = a.update_noise_multiplier(0.8)
    assert (z_d**-2 + (2 * 1.0) ** -2) ** -0.5 == pytest.approx(0.8)
    assert a.update_noise_multiplier(0.0) == 0.0
    with pytest.raises(ValueError, match="sigma_b > z / 2"):
        a.update_noise_multiplier(2.0)
    with pytest.raises(ValueError, match="sigma_b"):
        CentralDP(2.5, 1.0, 20, AdaptiveClipping(1.0, 20, count_stddev=1.0))
    assert AdaptiveClipping(1.0, expected_clients=100).count_stddev == 5.0  # m / 20, Andrew et al.


@pytest.mark.parametrize("gamma", [0.2, 0.5, 0.8])
def test_adaptive_clipping_converges_to_target_quantile(gamma):
    rng = np.random.default_rng(4)
    g = _gen(4)
    m = 100
    a = AdaptiveClipping(initial_clip_norm=0.02, expected_clients=m, target_quantile=gamma, learning_rate=0.2)
    log_c = []
    for _ in range(500):
        norms = rng.lognormal(mean=0.0, sigma=0.5, size=m)  # a fixed distribution of update norms
        a.step(float(a.indicators(norms).sum()), g)
        log_c.append(math.log(a.clip_norm))
    true_q = math.exp(0.5 * float(torch.special.ndtri(torch.tensor(gamma, dtype=torch.float64))))
    assert math.exp(np.mean(log_c[-150:])) == pytest.approx(true_q, rel=0.05)


def test_central_dp_with_adaptive_clipping_tracks_median_norm():
    torch.manual_seed(5)
    m, d = 50, 20
    dp = CentralDP(0.5, 0.05, m, AdaptiveClipping(0.05, m, target_quantile=0.5, learning_rate=0.3), seed=5)
    for _ in range(200):
        scale = torch.exp(torch.randn(m) * 0.3) * 3.0  # norms ~ 3 * lognormal: median ~ 3 * sqrt(d)
        u = torch.randn(m, d)
        u = u / torch.linalg.vector_norm(u, dim=1, keepdim=True) * scale.unsqueeze(1)
        res = dp.aggregate(u)
    assert res.clip_norm == pytest.approx(3.0, rel=0.15)
    assert res.noise_multiplier > res.accounting_noise_multiplier == 0.5


def test_central_dp_state_roundtrip_continues_identically():
    torch.manual_seed(6)
    batches = [torch.randn(10, 30) for _ in range(6)]

    def make():
        return CentralDP(1.0, 0.5, 10, AdaptiveClipping(0.5, 10, count_stddev=1.0), seed=9)

    ref = make()
    ref_out = [ref.aggregate(b).mean for b in batches]
    first = make()
    for b in batches[:3]:
        first.aggregate(b)
    state = json.loads(json.dumps(first.state_dict()))  # must survive JSON (checkpoint metadata)
    resumed = make()
    resumed.load_state_dict(state)
    assert resumed.clip_norm == first.clip_norm
    for b, want in zip(batches[3:], ref_out[3:]):
        assert torch.equal(resumed.aggregate(b).mean, want)


def test_central_dp_through_secure_aggregation_matches_plain_path():
    torch.manual_seed(7)
    u = torch.randn(12, 200) * 0.2
    kw = dict(noise_multiplier=0.7, clip_norm=1.0, expected_clients=12)
    plain = CentralDP(**kw, adaptive=AdaptiveClipping(1.0, 12, count_stddev=1.0), seed=1)
    secure = CentralDP(**kw, adaptive=AdaptiveClipping(1.0, 12, count_stddev=1.0), seed=1)
    sa = SecureAggregation(clip_range=1.0, max_clients=14, seed=0)
    for _ in range(3):
        a = plain.aggregate(u)
        b = secure.aggregate(u, secure=sa, dropped=2)
        # same noise draws; differences are quantization only (and the tiny clip slack)
        assert torch.allclose(a.mean, b.mean, atol=1e-5)
        # the clip indicators travel as an exact extra coordinate: identical C updates
        assert a.next_clip_norm == b.next_clip_norm
        u = u * 3
    assert sa.last is not None and len(sa.last.dropped) == 2


def test_central_dp_refuses_secure_range_below_one():
    dp = CentralDP(1.0, 1.0, 4, seed=0)
    with pytest.raises(ValueError, match="clip_range must be >= 1"):
        dp.aggregate(torch.ones(4, 3), secure=SecureAggregation(clip_range=0.5, max_clients=4, seed=0))


@pytest.mark.parametrize("c", [227.0, 3.0, 0.1])
def test_clip_small_row_factor_is_exactly_one(c):
    # regression: C / max(norm, C) computed as C * (1 / C) is not always 1.0 in float32
    for m in (np.ones((1, 1), dtype=np.float32), np.full((2, 3), c / 3, dtype=np.float32)):
        if np.linalg.norm(m[0]) <= c:
            assert np.array_equal(clip_updates(m, c)[0], m)
