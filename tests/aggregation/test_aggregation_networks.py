"""The comparator networks behind the coordinate-wise rules, and the fast rules against
straightforward references: every n from 1 to 40, even and odd, ties, tiny and huge
magnitudes, column blocks that do not divide d, one thread or several, and the sort
fallback for large n."""

import math

import numpy as np
import pytest
import torch
from aggregation_reference import ref_bulyan, ref_krum, ref_krum_scores, ref_trimmed_mean

from fleetlearn.aggregation import bulyan, geometric_median, krum, median, pairwise_sq_distances, trimmed_mean
from fleetlearn.aggregation import networks
from fleetlearn.aggregation.networks import network_program, network_schedule, run_network, sorting_network

RNG = np.random.default_rng(2024)


def run(x: np.ndarray, lo: int, hi: int, ordered: bool) -> np.ndarray:
    """Rows lo..hi-1 of x's columns by rank (as a set unless ordered), as the rules get them."""
    n, d = x.shape
    scratch = np.full((n + 1, d), np.nan, dtype=x.dtype)
    return np.stack(run_network(network_schedule(n, lo, hi, ordered), [x[i] for i in range(n)], scratch, np))


@pytest.mark.parametrize("n", range(1, 17))
def test_merge_exchange_sorts_every_zero_one_input(n):
    # The 0-1 principle: a comparator network that sorts every 0/1 input sorts every input.
    x = ((np.arange(1 << n)[None, :] >> np.arange(n)[:, None]) & 1).astype(np.float32)
    np.testing.assert_array_equal(run(x, 0, n, True), np.sort(x, axis=0))
    assert all(i < j for i, j in sorting_network(n))


@pytest.mark.parametrize("n", [17, 20, 31, 33, 64, 100, 128])
def test_merge_exchange_sorts_random_inputs_with_ties(n):
    x = RNG.integers(-3, 4, size=(n, 2000)).astype(np.float64)
    np.testing.assert_array_equal(run(x, 0, n, True), np.sort(x, axis=0))


@pytest.mark.parametrize("n", range(1, 41))
def test_pruned_programs_leave_the_right_values_on_the_wanted_wires(n):
    x = np.concatenate([RNG.normal(size=(n, 300)), RNG.integers(0, 3, size=(n, 300)).astype(float)], axis=1)
    ref = np.sort(x, axis=0)
    full = len(sorting_network(n))
    for k in sorted({0, 1, n // 10, n // 4, (n - 1) // 2}):
        if 2 * k >= n:
            continue
        as_set = network_program(n, k, n - k, False)
        assert sum(keep_min + keep_max for *_, keep_min, keep_max in as_set) <= 2 * full
        mid = run(x, k, n - k, False)
        np.testing.assert_array_equal(np.sort(mid, axis=0), ref[k : n - k])  # the middle values, as a set
        np.testing.assert_array_equal(run(x, k, n - k, True), ref[k : n - k])
        steps, outputs = network_schedule(n, k, n - k, False)
        assert len(steps) == sum(keep_min + keep_max for *_, keep_min, keep_max in as_set)
        assert len(set(outputs)) == len(outputs)


def test_a_program_never_writes_into_its_inputs():
    x = RNG.normal(size=(20, 100)).astype(np.float32)
    before = x.copy()
    run(x, 9, 11, False)
    run(x, 0, 20, True)
    np.testing.assert_array_equal(x, before)


def test_the_median_of_twenty_prunes_a_third_of_the_calls():
    program = network_program(20, 9, 11, False)
    calls = sum(keep_min + keep_max for *_, keep_min, keep_max in program)
    assert calls < 2 * len(sorting_network(20)) * 0.75


def matrices(n: int, d: int, dtype):
    """Random rows, rows with many ties, and rows mixing tiny and huge magnitudes."""
    big = 1e30 if dtype == np.float32 else 1e300
    tiny = 1e-30 if dtype == np.float32 else 1e-300
    yield RNG.normal(size=(n, d)).astype(dtype)
    yield RNG.integers(-2, 3, size=(n, d)).astype(dtype)
    mixed = RNG.normal(size=(n, d)) * np.where(RNG.random((n, d)) < 0.5, big, tiny)
    yield mixed.astype(dtype)


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def threads(request, monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    monkeypatch.setattr(networks, "BLOCK_ELEMENTS_CPU", 64)  # a few columns per block: many blocks, a ragged last one
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_median_equals_np_median_for_every_n_up_to_forty(threads, dtype):
    for n in range(1, 41):
        for x in matrices(n, 23, dtype):
            out = median(x)
            assert out.dtype == dtype
            np.testing.assert_array_equal(out, np.median(x, axis=0).astype(dtype), err_msg=f"n = {n}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_trimmed_mean_equals_the_exact_mean_of_the_middle_values_for_every_n_up_to_forty(threads, dtype):
    for n in range(1, 41):
        for beta in (0.0, 0.1, 0.25, 0.49):
            k = int(np.floor(beta * n + 1e-9))
            for x in matrices(n, 11, dtype):
                middle = [sorted(float(v) for v in col)[k : n - k] for col in x.T]
                exact = np.array([math.fsum(col) / len(col) for col in middle])
                # the sum is float64 (error below m * eps64 * mean |value|), rounded once to dtype
                bound = len(middle[0]) * 2.3e-16 * np.array([sum(map(abs, col)) / len(col) for col in middle])
                bound += np.finfo(dtype).eps * np.abs(exact)
                out = trimmed_mean(x, beta)
                assert out.dtype == dtype
                assert (np.abs(out.astype(np.float64) - exact) <= bound).all(), f"n = {n}, k = {k}"
                if dtype == np.float64 and x.dtype == np.float64:
                    np.testing.assert_allclose(trimmed_mean(x[:, :3], beta), ref_trimmed_mean(x[:, :3], k), rtol=1e-9, atol=1e-300 if k else 1e-9)


def test_network_rules_do_not_depend_on_threads_or_block_size(monkeypatch):
    x = RNG.normal(size=(20, 1000)).astype(np.float32)
    rules = [median, lambda u: trimmed_mean(u, 0.1), lambda u: bulyan(u, 4)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = [f(x) for f in rules]
        monkeypatch.setattr(networks, "BLOCK_ELEMENTS_CPU", 20 * 37)  # 37 columns a block, the last one ragged
        torch.set_num_threads(2)
        for f, w in zip(rules, want):
            np.testing.assert_array_equal(f(x), w)  # bit for bit: each coordinate is computed the same way
    finally:
        torch.set_num_threads(before)


def test_the_sort_fallback_above_the_network_limit_agrees(monkeypatch):
    x = RNG.normal(size=(25, 40)).astype(np.float32)
    x[:, ::3] = np.round(x[:, ::3])  # ties
    want = median(x), trimmed_mean(x, 0.2), bulyan(x, 3)
    monkeypatch.setattr(networks, "NETWORK_MAX_N_CPU", 8)
    np.testing.assert_array_equal(median(x), want[0])
    np.testing.assert_array_equal(trimmed_mean(x, 0.2), want[1])
    np.testing.assert_array_equal(bulyan(x, 3), want[2])
    np.testing.assert_array_equal(median(x), np.median(x, axis=0))


@pytest.mark.parametrize("n, f", [(3, 0), (7, 1), (11, 2), (20, 4), (23, 5)])
def test_bulyan_over_many_blocks_matches_the_loop_implementation(threads, n, f):
    # (the reference breaks ties between windows by row order, Bulyan by value: no ties here)
    x = RNG.normal(size=(n, 9))
    x[:f] += 50
    np.testing.assert_allclose(bulyan(x, f), ref_bulyan(x, f), rtol=1e-12, atol=0)
    np.testing.assert_allclose(bulyan(x.astype(np.float32), f), ref_bulyan(x.astype(np.float32), f), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n, f", [(5, 1), (20, 4), (33, 7)])
def test_float32_krum_from_block_gram_matrices_picks_the_reference_row(threads, n, f):
    x = RNG.normal(size=(n, 300)).astype(np.float32)
    x[:f] *= 3
    scores = ref_krum_scores(x, f)
    np.testing.assert_array_equal(krum(x, f), x[min(scores, key=lambda i: (scores[i], i))])
    np.testing.assert_allclose(krum(x, f, n - f), ref_krum(x, f, n - f), rtol=1e-6, atol=1e-6)


def test_float32_distances_survive_a_common_offset_and_huge_values():
    # float32 rows with no common offset (the product is centered) and sharing an offset
    # 1000x their spread (the rows are centered before the product)
    for offset in (0.0, 1e3):
        x = (offset + RNG.normal(size=(6, 500))).astype(np.float32)
        want = np.array([[((a.astype(float) - b) ** 2).sum() for b in x] for a in x])
        np.testing.assert_allclose(pairwise_sq_distances(x), want, rtol=1e-5)
    # values whose float32 squares overflow: those blocks are redone in float64
    y = RNG.normal(size=(7, 50)).astype(np.float32)
    y[0] *= np.float32(1e25)
    d = pairwise_sq_distances(y)
    assert torch.isfinite(d).all() and float(d[0, 1]) == pytest.approx(float((y[0].astype(float) - y[1]) @ (y[0].astype(float) - y[1])), rel=1e-5)
    np.testing.assert_array_equal(krum(y, 1), y[np.argmin([sum(sorted(float(v) for v in row)[1:5]) for row in d.numpy()])])
    gm = geometric_median(y, max_iter=30, ftol=0.0)
    np.testing.assert_allclose(gm, geometric_median(y.astype(np.float64), max_iter=30, ftol=0.0), rtol=1e-4, atol=1e-4)
    assert np.abs(gm).max() < 1e-15 * np.abs(y[0]).max()  # moving away from the huge row (Weiszfeld is slow from that far)


def test_float64_rows_of_huge_finite_values_are_not_mistaken_for_inf():
    x = np.full((5, 7), 1e308)  # every row's sum overflows
    x[1] = -1e308
    np.testing.assert_array_equal(median(x), np.full(7, 1e308))
    np.testing.assert_array_equal(trimmed_mean(x, 0.4), np.full(7, 1e308))


@pytest.mark.parametrize("n", [3, 8, 20, 40])
def test_the_torch_kernels_of_the_gpu_path_agree_with_numpys(monkeypatch, n):
    # The GPU runs the same networks with torch's kernels (and sorts above 32 rows);
    # run that code path on the CPU.
    x = torch.from_numpy(RNG.normal(size=(n, 57)).astype(np.float32))
    x[:, ::4] = x[:, ::4].round()
    f = (n - 3) // 4
    rules = [median, lambda u: trimmed_mean(u, 0.1), lambda u: bulyan(u, f)]
    want = [r(x) for r in rules]
    monkeypatch.setattr(networks, "NUMPY_ON_CPU", False)
    monkeypatch.setattr(networks, "BLOCK_ELEMENTS_CPU", 10 * n)
    for r, w in zip(rules, want):
        out = r(x)
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
        torch.testing.assert_close(out, w, rtol=0, atol=0)
