"""Client-side oversampling of under-represented classes."""

from __future__ import annotations

import numpy as np
import pytest

from fleetlearn.data.balance import oversample


def skewed(rng, counts, features=3):
    y = np.repeat(np.arange(len(counts)), counts)
    perm = rng.permutation(len(y))
    y = y[perm]
    x = np.column_stack([y.astype(np.float32) * 10 + np.arange(len(y)) / 1000, rng.normal(size=(len(y), features - 1))]).astype(np.float32)
    return x, y


def test_counts_equalised_originals_kept_copies_are_real_rows():
    rng = np.random.default_rng(0)
    x, y = skewed(rng, [50, 3, 0, 7, 1])
    x2, y2 = oversample(x, y, 5, np.random.default_rng(1))
    np.testing.assert_array_equal(np.bincount(y2, minlength=5), [50, 50, 0, 50, 50])
    np.testing.assert_array_equal(x2[: len(x)], x)  # originals first, unchanged
    np.testing.assert_array_equal(y2[: len(y)], y)
    # every copy is an exact duplicate of an original row of the same class
    originals = {tuple(r): c for r, c in zip(x.tolist(), y.tolist())}
    for row, label in zip(x2[len(x):].tolist(), y2[len(y):].tolist()):
        assert originals[tuple(row)] == label


def test_copies_are_drawn_from_all_minority_rows():
    rng = np.random.default_rng(2)
    x, y = skewed(rng, [400, 4])
    x2, y2 = oversample(x, y, 2, np.random.default_rng(3))
    used = {tuple(r) for r in x2[len(x):].tolist()}
    assert used == {tuple(r) for r in x[y == 1].tolist()}  # 396 draws from 4 rows hit them all


def test_noise_moves_only_the_copies_and_is_seeded():
    rng = np.random.default_rng(4)
    x, y = skewed(rng, [20, 5])
    a = oversample(x, y, 2, np.random.default_rng(5), noise_std=0.1)
    b = oversample(x, y, 2, np.random.default_rng(5), noise_std=0.1)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[0][: len(x)], x)
    extra = a[0][len(x):]
    assert extra.dtype == np.float32
    # the noise is N(0, 0.1^2): residual against the nearest same-class original is small but non-zero
    src = x[y == 1]
    resid = np.min(np.abs(extra[:, None, :] - src[None, :, :]).max(-1), axis=1)
    assert (resid > 0).all() and resid.max() < 1.0


def test_balanced_or_empty_input_is_returned_as_copy():
    x = np.ones((4, 2), np.float32)
    y = np.array([0, 1, 0, 1])
    x2, y2 = oversample(x, y, 3, np.random.default_rng(0))
    np.testing.assert_array_equal(x2, x)
    assert x2 is not x
    x3, y3 = oversample(np.zeros((0, 2), np.float32), np.zeros(0, np.int64), 3, np.random.default_rng(0))
    assert x3.shape == (0, 2) and y3.shape == (0,)


def test_bad_input():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="one row per label"):
        oversample(np.ones((3, 2)), np.array([0, 1]), 2, rng)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        oversample(np.ones((2, 2)), np.array([0, 2]), 2, rng)
    with pytest.raises(ValueError, match="integer"):
        oversample(np.ones((2, 2)), np.array([0.0, 1.0]), 2, rng)
    with pytest.raises(ValueError, match="noise_std"):
        oversample(np.ones((2, 2)), np.array([0, 1]), 2, rng, noise_std=-1.0)
