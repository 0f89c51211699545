"""Robustness, invariances, input kinds and devices of the robust aggregators."""

import inspect

import numpy as np
import pytest
import torch

from fleetlearn.aggregation import (
    AGGREGATORS,
    bulyan,
    centered_clipping,
    default_f,
    dnc,
    geometric_median,
    krum,
    mean,
    median,
    norm_bounded_mean,
    trimmed_mean,
)

RNG = np.random.default_rng(99)

# name -> function of (updates, weights) with the parameters fixed for a 20-row cohort, f = 4
RULES = {
    "median": lambda u, w=None: median(u),
    "trimmed_mean": lambda u, w=None: trimmed_mean(u, 0.2),
    "krum": lambda u, w=None: krum(u, 4),
    "multi_krum": lambda u, w=None: krum(u, 4, 12),
    "bulyan": lambda u, w=None: bulyan(u, 4),
    "geometric_median": lambda u, w=None: geometric_median(u, w),
    "norm_bounded_mean": lambda u, w=None: norm_bounded_mean(u, 3.0, w),
    "centered_clipping": lambda u, w=None: centered_clipping(u, 1.0, 5),
    "dnc": lambda u, w=None: dnc(u, 4),
}
TRANSLATION_EQUIVARIANT = ["median", "trimmed_mean", "krum", "multi_krum", "bulyan", "geometric_median", "dnc"]


def honest_and_attacked(n=20, f=4, d=50, scale=1e6):
    honest = RNG.normal(size=(n, d))
    attacked = honest.copy()
    attacked[:f] = scale * RNG.normal(size=(f, d))
    return honest, attacked


@pytest.mark.parametrize("name", sorted(RULES))
def test_f_scaled_rows_cannot_drag_a_robust_aggregate_away(name):
    honest, attacked = honest_and_attacked()
    out = RULES[name](attacked)
    good = honest[4:]
    # Nowhere near the 1e6 scale of the attackers: inside the ball around the honest
    # mean that holds every honest row.
    radius = np.linalg.norm(good - good.mean(0), axis=1).max()
    assert np.linalg.norm(out - good.mean(0)) <= radius
    if name in ("median", "trimmed_mean", "bulyan"):
        # coordinate-wise rules with f < trimmed count stay inside the honest range
        assert np.all(out >= good.min(0) - 1e-12) and np.all(out <= good.max(0) + 1e-12)
    if name == "krum":
        assert any(np.array_equal(out, row) for row in good)


def test_the_plain_mean_is_dragged_away():
    honest, attacked = honest_and_attacked()
    assert np.linalg.norm(mean(attacked) - honest[4:].mean(0)) > 1e4


@pytest.mark.parametrize("name", sorted(RULES))
def test_row_permutation_does_not_change_the_result(name):
    x = RNG.normal(size=(20, 30))
    w = RNG.uniform(1, 5, size=20)
    p = RNG.permutation(20)
    np.testing.assert_allclose(RULES[name](x[p], w[p]), RULES[name](x, w), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", TRANSLATION_EQUIVARIANT)
def test_translation_equivariance(name):
    x = RNG.normal(size=(20, 30))
    c = RNG.normal(scale=10, size=30)
    np.testing.assert_allclose(RULES[name](x + c), RULES[name](x) + c, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "krum", "multi_krum", "bulyan", "geometric_median", "centered_clipping", "dnc"])
def test_positive_scale_equivariance(name):
    x = RNG.normal(size=(20, 30))
    a = 3.5
    if name == "centered_clipping":  # tau is in the units of the updates
        np.testing.assert_allclose(centered_clipping(a * x, a * 1.0, 5), a * centered_clipping(x, 1.0, 5), rtol=1e-9, atol=1e-12)
    else:
        np.testing.assert_allclose(RULES[name](a * x), a * RULES[name](x), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "bulyan"])
def test_coordinate_rules_commute_with_negation(name):
    x = RNG.normal(size=(20, 30))
    np.testing.assert_allclose(RULES[name](-x), -RULES[name](x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(RULES))
def test_identical_rows_aggregate_to_that_row(name):
    row = RNG.normal(size=12)
    x = np.tile(row, (20, 1))
    expected = row if name not in ("norm_bounded_mean", "centered_clipping") else None
    out = RULES[name](x)
    if expected is not None:
        np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    else:
        assert np.all(np.isfinite(out))


@pytest.mark.parametrize("name", sorted(RULES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_in_numpy_out_torch_in_torch_out_same_answer(name, dtype):
    x = RNG.normal(size=(20, 17)).astype(dtype)
    w = RNG.uniform(1, 5, size=20)
    a = RULES[name](x, w)
    t = RULES[name](torch.from_numpy(x), torch.from_numpy(w))
    assert isinstance(a, np.ndarray) and a.shape == (17,) and a.dtype == dtype
    assert isinstance(t, torch.Tensor) and t.shape == (17,) and t.dtype == torch.from_numpy(x).dtype
    np.testing.assert_array_equal(a, t.numpy())


@pytest.mark.parametrize("name", sorted(RULES))
def test_integer_and_half_inputs_are_computed_in_float32(name):
    x = RNG.integers(-5, 5, size=(20, 6))
    out = RULES[name](x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, RULES[name](x.astype(np.float32)))
    t = RULES[name](torch.from_numpy(x).half())
    assert t.dtype == torch.float32


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "geometric_median", "norm_bounded_mean", "centered_clipping"])
def test_a_single_client(name):
    row = RNG.normal(size=(1, 7))
    fn = {
        "median": lambda u: median(u),
        "trimmed_mean": lambda u: trimmed_mean(u, 0.4),
        "geometric_median": lambda u: geometric_median(u),
        "norm_bounded_mean": lambda u: norm_bounded_mean(u, 1e9),
        "centered_clipping": lambda u: centered_clipping(u, 1e9, 1),
    }[name]
    np.testing.assert_allclose(fn(row), row[0], rtol=1e-12)


def test_krum_and_bulyan_on_the_smallest_cohorts_they_accept():
    x = RNG.normal(size=(3, 4))
    assert any(np.array_equal(krum(x, 0), r) for r in x)
    assert bulyan(x, 0).shape == (4,)


def test_zero_width_updates_give_an_empty_aggregate():
    x = np.zeros((5, 0), dtype=np.float32)
    for fn in (median, lambda u: trimmed_mean(u, 0.2), lambda u: krum(u, 1), lambda u: bulyan(u, 0), geometric_median, lambda u: norm_bounded_mean(u, 1.0), lambda u: centered_clipping(u, 1.0)):
        assert fn(x).shape == (0,)


def test_registry_parts_are_robust_and_need_individual_updates():
    x = torch.from_numpy(RNG.normal(size=(20, 9)).astype(np.float32))
    w = torch.ones(20)
    for name, cls in AGGREGATORS.items():
        if name == "mean":
            continue
        part = cls()
        assert part.name == name and part.needs_individual_updates is True
        out = part.aggregate(x, w)
        assert isinstance(out, torch.Tensor) and out.shape == (9,) and torch.isfinite(out).all()
        # every config key maps to a constructor keyword
        params = inspect.signature(cls).parameters
        assert all(arg in params for arg in cls.config_keys.values())


def test_registry_parts_use_their_parameters():
    x = torch.from_numpy(RNG.normal(size=(20, 9)))
    w = torch.from_numpy(RNG.uniform(1, 3, size=20))
    torch.testing.assert_close(AGGREGATORS["trimmed_mean"](beta=0.3).aggregate(x, w), trimmed_mean(x, 0.3))
    torch.testing.assert_close(AGGREGATORS["krum"](f=2).aggregate(x, w), krum(x, 2))
    torch.testing.assert_close(AGGREGATORS["multi_krum"](f=2, m=5).aggregate(x, w), krum(x, 2, 5))
    torch.testing.assert_close(AGGREGATORS["multi_krum"](f=2).aggregate(x, w), krum(x, 2, 18))  # m = n - f
    torch.testing.assert_close(AGGREGATORS["bulyan"](f=3).aggregate(x, w), bulyan(x, 3))
    torch.testing.assert_close(AGGREGATORS["geometric_median"]().aggregate(x, w), geometric_median(x, w))
    torch.testing.assert_close(AGGREGATORS["norm_bounded_mean"](max_norm=1.5).aggregate(x, w), norm_bounded_mean(x, 1.5, w))
    torch.testing.assert_close(AGGREGATORS["centered_clipping"](tau=0.5, iters=2).aggregate(x, w), centered_clipping(x, 0.5, 2))


@pytest.mark.parametrize("n, krum_f, bulyan_f", [(3, 0, 0), (5, 1, 0), (7, 1, 1), (10, 2, 1), (20, 4, 4), (100, 20, 20), (11, 2, 2)])
def test_default_f_is_a_fifth_of_the_cohort_clamped_to_the_precondition(n, krum_f, bulyan_f):
    assert default_f(n, "krum") == krum_f and n > 2 * krum_f + 2
    assert default_f(n, "bulyan") == bulyan_f and n >= 4 * bulyan_f + 3
    x = torch.from_numpy(RNG.normal(size=(n, 4)))
    torch.testing.assert_close(AGGREGATORS["krum"]().aggregate(x, None), krum(x, krum_f))
    torch.testing.assert_close(AGGREGATORS["bulyan"]().aggregate(x, None), bulyan(x, bulyan_f))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("name", sorted(RULES))
def test_gpu_result_stays_on_the_gpu_and_matches_the_cpu(name):
    x = torch.from_numpy(RNG.normal(size=(20, 5000)))
    w = torch.from_numpy(RNG.uniform(1, 5, size=20))
    out = RULES[name](x.cuda(), w.cuda())
    assert out.device.type == "cuda" and out.shape == (5000,)
    torch.testing.assert_close(out.cpu(), RULES[name](x, w), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_no_registered_rule_writes_into_its_input(name):
    """The engine hands a rule the intake's decode matrix itself (no copy): a rule that sorted,
    clipped or centred its rows in place would corrupt the round's measurements and records."""
    x = torch.from_numpy(RNG.normal(size=(20, 300)).astype(np.float32))
    x[:3] *= 50.0  # outliers, so clipping / trimming rules have something to cut
    w = torch.rand(20, generator=torch.Generator().manual_seed(0)) + 0.5
    before, w_before = x.clone(), w.clone()
    part = AGGREGATORS[name]()
    out = part.aggregate(x, w)
    assert torch.equal(x, before) and torch.equal(w, w_before), f"{name} wrote into its input"
    assert out.shape == (300,) and out.data_ptr() != x.data_ptr()
