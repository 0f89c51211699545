"""Each robust aggregator equals an independent, loop-based computation."""

import numpy as np
import pytest
import torch
from aggregation_reference import (
    gm_objective,
    ref_bulyan,
    ref_centered_clipping,
    ref_geometric_median,
    ref_krum,
    ref_krum_scores,
    ref_norm_bounded_mean,
    ref_trimmed_mean,
)
from scipy.optimize import minimize

from fleetlearn.aggregation import (
    bulyan,
    centered_clipping,
    geometric_median,
    krum,
    median,
    norm_bounded_mean,
    pairwise_sq_distances,
    trimmed_mean,
)
from fleetlearn.aggregation import networks

RNG = np.random.default_rng(1234)


def close(a, b, tol=1e-6):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=tol, atol=tol)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 10])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_median_equals_np_median(n, dtype):
    x = RNG.normal(size=(n, 13)).astype(dtype)
    out = median(x)
    assert out.dtype == dtype and out.shape == (13,)
    np.testing.assert_array_equal(out, np.median(x, axis=0).astype(dtype))


def test_median_and_trimmed_mean_across_many_column_blocks(monkeypatch):
    monkeypatch.setattr(networks, "BLOCK_ELEMENTS_CPU", 16)  # 16 // 5 = 3 columns per block
    x = RNG.normal(size=(5, 20))
    np.testing.assert_array_equal(median(x), np.median(x, axis=0))
    close(trimmed_mean(x, 0.2), ref_trimmed_mean(x, 1), 1e-12)
    close(pairwise_sq_distances(x), [[((a - b) ** 2).sum() for b in x] for a in x], 1e-10)
    close(bulyan(np.vstack([x, x + 0.1, x[:1]]), 2), ref_bulyan(np.vstack([x, x + 0.1, x[:1]]), 2), 1e-10)


@pytest.mark.parametrize(
    "n, beta, k",
    [(1, 0.3, 0), (5, 0.0, 0), (10, 0.1, 1), (10, 0.25, 2), (7, 0.3, 2), (20, 0.45, 9), (3, 0.49, 1), (100, 0.29, 29)],
)
def test_trimmed_mean_drops_floor_beta_n_per_side(n, beta, k):
    x = RNG.normal(size=(n, 9))
    close(trimmed_mean(x, beta), ref_trimmed_mean(x, k), 1e-12)
    x32 = x.astype(np.float32)
    close(trimmed_mean(x32, beta), ref_trimmed_mean(x32, k), 1e-6)


def test_pairwise_distances_survive_a_large_common_offset():
    # Gram-trick distances lose everything to cancellation here unless centered and float64.
    x = 1e4 + RNG.normal(scale=1e-3, size=(6, 1000))
    expected = [[((a - b) ** 2).sum() for b in x] for a in x]
    close(pairwise_sq_distances(x), expected, 1e-6)


@pytest.mark.parametrize("n, f", [(3, 0), (5, 1), (9, 2), (12, 3), (20, 4)])
def test_krum_picks_the_brute_force_argmin(n, f):
    x = RNG.normal(size=(n, 8))
    x[: f] *= 5  # some far rows so the scores differ clearly
    scores = ref_krum_scores(x, f)
    expected_row = min(scores, key=scores.get)
    out = krum(x, f)
    np.testing.assert_array_equal(out, x[expected_row])  # Krum returns a row, bit for bit
    out32 = krum(torch.from_numpy(x.astype(np.float32)), f)
    np.testing.assert_array_equal(out32.numpy(), x[expected_row].astype(np.float32))


@pytest.mark.parametrize("n, f, m", [(7, 1, 2), (9, 2, 5), (12, 3, 9), (12, 3, 12), (20, 4, 16)])
def test_multi_krum_is_the_mean_of_the_m_best(n, f, m):
    x = RNG.normal(size=(n, 8))
    close(krum(x, f, m), ref_krum(x, f, m), 1e-12)
    close(krum(x.astype(np.float32), f, m), ref_krum(x.astype(np.float32), f, m), 1e-6)


@pytest.mark.parametrize("n, f", [(3, 0), (4, 0), (7, 1), (8, 1), (11, 2), (12, 2), (16, 3)])
def test_bulyan_matches_the_loop_implementation(n, f):
    x = RNG.normal(size=(n, 10))
    x[:f] = 50 + RNG.normal(size=(f, 10))
    close(bulyan(x, f), ref_bulyan(x, f), 1e-12)
    close(bulyan(x.astype(np.float32), f), ref_bulyan(x.astype(np.float32), f), 1e-6)


def test_bulyan_with_f_zero_on_three_rows_averages_the_window_nearest_the_median():
    x = np.array([[0.0], [1.0], [10.0]])
    # theta = 3, beta = 3: every value is kept
    close(bulyan(x, 0), [11.0 / 3])


@pytest.mark.parametrize("n, d", [(1, 4), (2, 3), (5, 3), (11, 6)])
def test_geometric_median_matches_weiszfeld_and_minimises_the_objective(n, d):
    x = RNG.normal(size=(n, d))
    w = RNG.uniform(0.5, 2.0, size=n)
    out = geometric_median(x, w, eps=1e-12, max_iter=2000, ftol=0.0)
    close(out, ref_geometric_median(x, w), 1e-6)
    best = minimize(lambda v: gm_objective(x, v, w), x.mean(0), method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000})
    assert gm_objective(x, out, w) <= best.fun + 1e-8


def test_geometric_median_of_collinear_points_is_the_middle_one():
    x = np.array([[0.0, 0.0], [1.0, 0.0], [100.0, 0.0]])
    close(geometric_median(x, eps=1e-12, max_iter=5000, ftol=0.0), [1.0, 0.0], 1e-6)


@pytest.mark.parametrize("max_norm", [0.5, 2.0, 100.0])
def test_norm_bounded_mean_clips_then_averages(max_norm):
    x = RNG.normal(scale=2.0, size=(7, 5))
    w = RNG.uniform(1, 10, size=7)
    close(norm_bounded_mean(x, max_norm), ref_norm_bounded_mean(x, max_norm), 1e-12)
    close(norm_bounded_mean(x, max_norm, w), ref_norm_bounded_mean(x, max_norm, w), 1e-12)


def test_norm_bounded_mean_default_bound_is_the_median_norm():
    x = np.diag([1.0, 2.0, 3.0, 40.0, 50.0])  # norms 1, 2, 3, 40, 50: median 3
    close(norm_bounded_mean(x, None), ref_norm_bounded_mean(x, 3.0), 1e-12)


@pytest.mark.parametrize("tau, iters", [(0.1, 1), (1.0, 3), (5.0, 10)])
def test_centered_clipping_matches_the_loop_implementation(tau, iters):
    x = RNG.normal(loc=1.0, size=(9, 6))
    close(centered_clipping(x, tau, iters), ref_centered_clipping(x, tau, iters), 1e-12)
    c = RNG.normal(size=6)
    close(centered_clipping(x, tau, iters, center=c), ref_centered_clipping(x, tau, iters, c), 1e-12)
    close(centered_clipping(torch.from_numpy(x), tau, iters, center=torch.from_numpy(c)).numpy(), ref_centered_clipping(x, tau, iters, c), 1e-12)


def test_centered_clipping_default_tau_is_the_median_distance_from_the_center():
    x = np.diag([1.0, 2.0, 3.0, 40.0, 50.0])
    close(centered_clipping(x, None, 4), ref_centered_clipping(x, 3.0, 4), 1e-12)


def test_centered_clipping_with_one_iteration_from_zero_is_the_norm_bounded_mean():
    x = RNG.normal(size=(8, 5))
    close(centered_clipping(x, 0.7, 1), norm_bounded_mean(x, 0.7), 1e-12)
