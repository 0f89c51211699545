"""Synthetic(alpha, beta) of FedProx."""

import numpy as np
import pytest

import fleetlearn.data.synthetic as synthetic
from fleetlearn.config import DataConfig
from fleetlearn.data import load_federated


def load(seed=0, **kwargs):
    return load_federated(DataConfig(dataset="synthetic", partition="natural", **kwargs), seed)


def test_default_population_follows_fedprox():
    data = load(synthetic_alpha=1.0, synthetic_beta=1.0)
    assert data.num_clients == 30 and data.num_features == 60 and data.num_classes == 10
    sizes = data.train_sizes() + data.test_sizes()
    assert sizes.min() >= 50
    np.testing.assert_array_equal(data.train_sizes(), (0.9 * sizes).astype(int))  # FedProx's 90/10 split
    y = data.y.numpy()
    assert y.min() >= 0 and y.max() < 10
    assert str(data.x.dtype) == "torch.float32" and str(data.y.dtype) == "torch.int64"
    # Central test set = the union of the devices' local test splits.
    np.testing.assert_array_equal(data.central_x, data.x[data.test_order])
    np.testing.assert_array_equal(data.central_y, data.y[data.test_order])


def test_input_covariance_decays_as_in_the_paper():
    data = load(synthetic_iid=True, clients=60)
    variance = data.x.numpy().var(axis=0)
    expected = np.arange(1, 61) ** -1.2
    np.testing.assert_allclose(variance, expected, rtol=0.15)


def test_beta_makes_devices_label_mixes_differ_more():
    def mean_skew(**kw):
        return np.mean([load(seed, clients=200, **kw).stats["label_skew"] for seed in range(3)])

    assert mean_skew(synthetic_alpha=1.0, synthetic_beta=1.0) > mean_skew(synthetic_alpha=0.0, synthetic_beta=0.0)


def test_alpha_shifts_every_logit_alike_so_labels_do_not_change():
    # A property of FedProx's generator (u_k is the mean of all of W_k and b_k), kept faithfully.
    np.testing.assert_array_equal(load(synthetic_alpha=0.0).y, load(synthetic_alpha=3.0).y)


def test_iid_variant_shares_one_model_and_zero_input_means():
    iid = load(synthetic_iid=True, synthetic_alpha=1.0, synthetic_beta=1.0)
    non_iid = load(synthetic_alpha=1.0, synthetic_beta=1.0)
    assert iid.stats["label_skew"] < 0.2 < 0.6 < non_iid.stats["label_skew"]

    def device_input_means(data):
        x = data.x.numpy()
        return np.array([x[data.train_indices(c)].mean() for c in range(data.num_clients)])

    assert np.abs(device_input_means(iid)).max() < 0.2
    assert np.abs(device_input_means(non_iid)).max() > 0.5


def test_device_size_is_capped(monkeypatch):
    monkeypatch.setattr(synthetic, "MAX_DEVICE_EXAMPLES", 120)
    x, y, device = synthetic.generate_synthetic(300, 0.0, 0.0, False, 5, 3, np.random.default_rng(0))
    sizes = np.bincount(device)
    assert sizes.max() == 120 and sizes.min() >= 50
    assert x.shape == (sizes.sum(), 5) and y.shape == device.shape


def test_pooled_with_another_partition():
    """The same 12 devices' data, pooled: a stratified 20% is central, the rest is re-partitioned."""
    data = load_federated(DataConfig(dataset="synthetic", partition="dirichlet", clients=12, alpha=0.3), 0)
    native = load(clients=12)
    assert data.num_clients == 12
    assert len(data.x) + len(data.central_x) == len(native.x)
    assert len(data.central_x) == pytest.approx(0.2 * len(native.x), abs=10)


def test_seeded():
    np.testing.assert_array_equal(load(seed=1).x, load(seed=1).x)
    one, two = load(seed=1).x, load(seed=2).x
    assert one.shape != two.shape or not np.array_equal(one, two)
