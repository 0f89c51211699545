"""Partitioners: exact cover, min_examples, and the skew each one is meant to produce."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetlearn.config import DataConfig
from fleetlearn.data import DataError, label_skew_per_client
from fleetlearn.data.heterogeneity import heterogeneity_stats
from fleetlearn.data.partition import PARTITIONERS, apportion, feature_shift, natural, top_up


def assert_exact_cover(order, offsets, n, num_clients):
    assert order.dtype == np.int64 and offsets.dtype == np.int64
    assert len(offsets) == num_clients + 1 and offsets[0] == 0 and offsets[-1] == n
    assert np.all(np.diff(offsets) >= 0)
    np.testing.assert_array_equal(np.sort(order), np.arange(n))  # no loss, no duplicates


def skew(labels, order, offsets):
    return heterogeneity_stats(labels[order], offsets, int(labels.max()) + 1)


LABELS = np.random.default_rng(0).integers(0, 10, 2000)
# label_share (binary labels only) leaves out what does not fit its exact shares:
# tests/foundation/test_spam_data.py checks its own invariants.
EXACT_COVER = sorted(set(PARTITIONERS) - {"label_share"})


@pytest.mark.parametrize("name", EXACT_COVER)
def test_partition_covers_every_example_once_and_honours_min_examples(name):
    cfg = DataConfig(partition=name, alpha=0.05, min_examples=5)
    order, offsets = PARTITIONERS[name](LABELS, 50, np.random.default_rng(1), cfg)
    assert_exact_cover(order, offsets, len(LABELS), 50)
    assert np.diff(offsets).min() >= 5


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(EXACT_COVER),
    num_clients=st.integers(1, 20),
    min_examples=st.integers(1, 6),
    extra=st.integers(0, 60),
    num_classes=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_partition_invariants_hold_for_any_small_population(name, num_clients, min_examples, extra, num_classes, seed):
    rng = np.random.default_rng(seed)
    n = num_clients * min_examples + extra
    labels = rng.integers(0, num_classes, n)
    cfg = DataConfig(partition=name, alpha=0.1, min_examples=min_examples, shards_per_client=3, quantity_sigma=2.0)
    order, offsets = PARTITIONERS[name](labels, num_clients, rng, cfg)
    assert_exact_cover(order, offsets, n, num_clients)
    assert np.diff(offsets).min() >= min_examples


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
def test_too_little_data_names_the_numbers(name):
    with pytest.raises(DataError, match=r"5 examples cannot give 10 clients .*min_examples = 1"):
        PARTITIONERS[name](np.arange(5) % 2, 10, np.random.default_rng(0), DataConfig(min_examples=1))


def test_dirichlet_small_alpha_skews_labels_and_iid_does_not():
    rng = np.random.default_rng(0)
    iid_skew = skew(LABELS, *PARTITIONERS["iid"](LABELS, 5, rng, DataConfig()))["label_skew"]
    dirichlet_skew = skew(LABELS, *PARTITIONERS["dirichlet"](LABELS, 5, rng, DataConfig(alpha=0.05)))["label_skew"]
    assert iid_skew < 0.1  # 400 examples per client: only sampling noise
    assert dirichlet_skew > iid_skew + 0.4


def test_dirichlet_large_alpha_approaches_iid():
    rng = np.random.default_rng(0)
    small = skew(LABELS, *PARTITIONERS["dirichlet"](LABELS, 5, rng, DataConfig(alpha=0.1)))["label_skew"]
    large = skew(LABELS, *PARTITIONERS["dirichlet"](LABELS, 5, rng, DataConfig(alpha=1000.0)))["label_skew"]
    assert large < 0.1 < small


def test_shards_give_each_client_at_most_shards_per_client_classes():
    labels = np.repeat(np.arange(10), 30)  # 10 clients x 3 shards of 10: boundaries align with classes
    order, offsets = PARTITIONERS["shards"](labels, 10, np.random.default_rng(0), DataConfig(shards_per_client=3))
    assert_exact_cover(order, offsets, 300, 10)
    assert np.all(np.diff(offsets) == 30)
    classes_per_client = [len(np.unique(labels[order[a:b]])) for a, b in zip(offsets[:-1], offsets[1:])]
    assert max(classes_per_client) <= 3


@pytest.mark.parametrize("law", ["lognormal", "powerlaw"])
def test_quantity_skews_sizes_not_labels(law):
    rng = np.random.default_rng(0)
    iid_stats = skew(LABELS, *PARTITIONERS["iid"](LABELS, 40, rng, DataConfig()))
    cfg = DataConfig(quantity=law, quantity_sigma=1.5, min_examples=3)
    order, offsets = PARTITIONERS["quantity"](LABELS, 40, rng, cfg)
    stats = skew(LABELS, order, offsets)
    assert stats["size_cv"] > iid_stats["size_cv"] + 0.5
    assert stats["size_min"] >= 3


def test_top_up_moves_only_surplus_examples():
    owner = np.array([0] * 20 + [1] * 3 + [2] * 1, dtype=np.int64)  # client 3 has none
    new_owner = top_up(owner, 4, 4, np.random.default_rng(0))
    sizes = np.bincount(new_owner, minlength=4)
    np.testing.assert_array_equal(sizes, [20 - 8, 4, 4, 4])  # deficit 1 + 3 + 4, all from client 0
    moved = new_owner != owner
    assert np.all(owner[moved] == 0)  # receivers keep what they had
    np.testing.assert_array_equal(new_owner[:20][~moved[:20]], 0)


def test_apportion_sums_exactly_even_with_extreme_weights():
    sizes = apportion(1000, np.array([0.0, 800.0, 799.0, -50.0]))
    assert sizes.sum() == 1000 and sizes.min() >= 0
    assert sizes[1] > sizes[2] > sizes[0] == sizes[3] == 0
    np.testing.assert_array_equal(apportion(7, np.zeros(3)).sum(), 7)


def test_natural_groups_by_device_id_whatever_the_ids():
    devices = np.array([70, 3, 70, 100, 3, 70])
    (order, offsets), device_ids = natural(devices, np.random.default_rng(0))
    np.testing.assert_array_equal(device_ids, [3, 70, 100])
    assert_exact_cover(order, offsets, 6, 3)
    for c, device in enumerate(device_ids):
        np.testing.assert_array_equal(devices[order[offsets[c] : offsets[c + 1]]], device)


def test_feature_shift_is_one_affine_map_per_client_and_touches_only_clients_rows():
    x = np.ones((7, 3), dtype=np.float32)  # equal rows: after the shift, equal within a client
    train = (np.array([0, 1, 2, 3], dtype=np.int64), np.array([0, 2, 4], dtype=np.int64))
    test = (np.array([4, 5], dtype=np.int64), np.array([0, 1, 2], dtype=np.int64))
    feature_shift(x, [train, test], 1.0, np.random.default_rng(0))
    np.testing.assert_array_equal(x[6], 1.0)  # row 6 belongs to no client
    np.testing.assert_array_equal(x[0], x[1])
    np.testing.assert_array_equal(x[0], x[4])  # client 0's test row shares its train transform
    np.testing.assert_array_equal(x[2], x[5])
    assert not np.allclose(x[0], x[2]) and not np.allclose(x[0], 1.0)
    unchanged = np.ones((7, 3), dtype=np.float32)
    feature_shift(unchanged, [train, test], 0.0, np.random.default_rng(0))
    np.testing.assert_array_equal(unchanged, 1.0)


def test_label_skew_matches_a_direct_total_variation_computation():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, 60)
    offsets = np.array([0, 10, 10 + 25, 60])
    pooled = np.bincount(labels, minlength=4) / 60
    expected = [0.5 * np.abs(np.bincount(labels[a:b], minlength=4) / (b - a) - pooled).sum() for a, b in zip(offsets[:-1], offsets[1:])]
    np.testing.assert_allclose(label_skew_per_client(labels, offsets, 4), expected)


def test_label_skew_is_zero_for_identical_mixes_and_half_for_disjoint_halves():
    np.testing.assert_allclose(label_skew_per_client(np.array([0, 1, 0, 1]), np.array([0, 2, 4]), 2), [0, 0])
    np.testing.assert_allclose(label_skew_per_client(np.array([0, 0, 1, 1]), np.array([0, 2, 4]), 2), [0.5, 0.5])


def test_histograms_are_omitted_above_a_thousand_clients():
    offsets = np.arange(1002, dtype=np.int64)
    stats = heterogeneity_stats(np.zeros(1001, dtype=np.int64), offsets, 2)
    assert stats["label_histograms_omitted"] is True and "label_histograms" not in stats
    small = heterogeneity_stats(np.array([0, 1, 1]), np.array([0, 1, 3]), 3)
    assert small["label_histograms"] == [[1, 0, 0], [0, 2, 0]]
