"""load_federated on the bundled digits: storage, central hold-out, local split, stats, seeds."""

import importlib.util
import json

import numpy as np
import pytest

from fleetlearn.config import DataConfig
from fleetlearn.data import DataError, FederatedData, load_federated
from fleetlearn.data.datasets import load_digits


def load(seed=0, **kwargs) -> FederatedData:
    return load_federated(DataConfig(**kwargs), seed)


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "shards", "quantity", "feature"])
def test_every_client_example_is_owned_once_and_central_is_apart(partition):
    data = load(partition=partition, clients=20, min_examples=4)
    assert data.name == "digits" and data.num_clients == 20
    assert data.x.shape == (len(data.y), 64) and data.num_features == 64 and data.num_classes == 10
    owned = np.concatenate([data.train_order, data.test_order])
    np.testing.assert_array_equal(np.sort(owned), np.arange(len(data.x)))
    assert len(data.x) + len(data.central_x) == 1797
    assert data.train_sizes().min() >= 4
    np.testing.assert_array_equal(data.train_sizes(), [len(data.train_indices(c)) for c in range(20)])
    np.testing.assert_array_equal(data.test_sizes(), [len(data.test_indices(c)) for c in range(20)])


def test_central_set_is_a_stratified_fifth_of_the_untouched_digits():
    data = load(partition="feature", clients=10)
    digits = load_digits()
    expected = np.floor(0.2 * np.bincount(digits.y) + 0.5)
    np.testing.assert_array_equal(np.bincount(data.central_y.numpy(), minlength=10), expected)
    # Every central row is a row of the original data (no feature shift, no copies from clients).
    rows = {r.tobytes() for r in digits.x}
    assert all(r.tobytes() in rows for r in data.central_x.numpy())


def test_digits_are_read_from_scikit_learns_file_without_importing_it_and_equal_its_loader(monkeypatch):
    import subprocess
    import sys

    from sklearn.datasets import load_digits as sklearn_digits

    from fleetlearn.data import datasets

    ours = load_digits()
    x, y = sklearn_digits(return_X_y=True)
    np.testing.assert_array_equal(ours.x, (x / 16.0).astype(np.float32))
    np.testing.assert_array_equal(ours.y, y)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # the file not found: scikit-learn loads it
    assert datasets._digits_rows() is None
    fallback = load_digits()
    np.testing.assert_array_equal(fallback.x, ours.x)
    np.testing.assert_array_equal(fallback.y, ours.y)
    code = ("import sys\nfrom fleetlearn.data.datasets import _digits_rows, load_digits\n"
            "assert _digits_rows() is not None and load_digits().x.shape == (1797, 64)\nprint('sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]


def test_local_split_fraction_and_min_examples():
    data = load(partition="iid", clients=10, local_test_fraction=0.25)
    sizes = data.train_sizes() + data.test_sizes()
    np.testing.assert_array_equal(data.train_sizes(), np.floor(0.75 * sizes))
    tight = load(partition="iid", clients=100, min_examples=14, local_test_fraction=0.5)  # 14-15 per client
    assert tight.train_sizes().min() >= 14 and tight.test_sizes().max() <= 1
    none = load(partition="iid", clients=10, local_test_fraction=0.0)
    assert none.test_sizes().sum() == 0 and len(none.test_order) == 0


def test_stats_match_an_independent_count_and_are_json():
    data = load(partition="dirichlet", clients=8, alpha=0.3)
    stats = json.loads(json.dumps(data.stats))
    y = data.y.numpy()
    histograms = [np.bincount(y[data.train_indices(c)], minlength=10).tolist() for c in range(8)]
    assert stats["label_histograms"] == histograms
    sizes = data.train_sizes()
    assert stats["size_min"] == sizes.min() and stats["size_max"] == sizes.max()
    assert stats["size_median"] == np.median(sizes)
    assert stats["size_cv"] == pytest.approx(sizes.std() / sizes.mean())
    assert stats["clients"] == 8 and stats["partition"] == "dirichlet" and stats["central_examples"] == len(data.central_y)


def test_label_skew_orders_partitions_as_intended():
    iid = load(partition="iid", clients=4).stats
    dirichlet = load(partition="dirichlet", clients=4, alpha=0.05).stats
    shards = load(partition="shards", clients=4, shards_per_client=1).stats
    quantity = load(partition="quantity", clients=20, quantity_sigma=1.5).stats
    assert iid["label_skew"] < 0.1
    assert dirichlet["label_skew"] > 0.4 and shards["label_skew"] > 0.5
    assert quantity["size_cv"] > load(partition="iid", clients=20).stats["size_cv"] + 0.5


def test_feature_partition_shifts_client_inputs_but_not_central():
    plain = load(partition="iid", clients=10)
    shifted = load(partition="feature", clients=10, feature_shift=1.0)
    np.testing.assert_array_equal(shifted.train_order, plain.train_order)  # same split, same seed
    np.testing.assert_array_equal(shifted.central_x, plain.central_x)
    changed_rows = (shifted.x != plain.x).any(dim=1).numpy()
    assert changed_rows.all()
    unshifted = load(partition="feature", clients=10, feature_shift=0.0)
    np.testing.assert_array_equal(unshifted.x, plain.x)


def test_same_seed_same_population_other_seed_other_population():
    a, b, c = load(seed=5, clients=10), load(seed=5, clients=10), load(seed=6, clients=10)
    for field in ("train_order", "train_offsets", "test_order", "test_offsets"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.central_y, b.central_y)
    assert not np.array_equal(a.train_order, c.train_order)
    assert not np.array_equal(a.central_y, c.central_y)


def test_too_many_clients_for_the_data_names_the_numbers():
    with pytest.raises(DataError, match=r"digits: partition 'iid': 1438 examples cannot give 1000 clients .*min_examples = 2"):
        load(partition="iid", clients=1000)


def test_natural_partition_needs_devices():
    with pytest.raises(DataError, match=r"'natural' needs a dataset with its own devices; 'digits' has none"):
        load(partition="natural")


def test_negative_seed_is_refused():
    with pytest.raises(DataError, match="seed must be >= 0"):
        load(seed=-1)
