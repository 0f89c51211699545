"""Custom datasets named by import path 'pkg.module:function'."""

from pathlib import Path

import numpy as np
import pytest

from fleetlearn.config import DataConfig
from fleetlearn.data import DataError, load_federated

@pytest.fixture
def import_here(monkeypatch):
    """Make tiny_federated_dataset importable by its import path."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


def load(function, seed=0, **kwargs):
    return load_federated(DataConfig(dataset=f"tiny_federated_dataset:{function}", **kwargs), seed)


def test_natural_partition_gives_one_client_per_device(import_here):
    import tiny_federated_dataset

    devices = tiny_federated_dataset.blobs(3)["client"]
    data = load("blobs", seed=3, partition="natural", local_test_fraction=0.25)
    assert data.num_clients == 4 and data.num_features == 5 and data.num_classes == 3
    assert data.name == "tiny_federated_dataset:blobs"
    device_of_client = []
    for c in range(4):
        owned = np.concatenate([data.train_indices(c), data.test_indices(c)])
        assert len(np.unique(devices[owned])) == 1
        device_of_client.append(devices[owned][0])
    assert device_of_client == [4, 7, 11, 25]  # clients are the sorted device ids
    np.testing.assert_array_equal(data.train_sizes(), np.floor(0.75 * np.array([9, 15, 12, 10])))
    np.testing.assert_array_equal(data.central_y, data.y[data.test_order])


def test_other_partitions_ignore_devices(import_here):
    data = load("no_devices", partition="iid", clients=3)
    assert data.num_clients == 3 and len(data.x) + len(data.central_x) == 46


@pytest.mark.parametrize(
    ("function", "kwargs", "message"),
    [
        ("no_devices", {"partition": "natural"}, r"has none .*'client' array"),
        ("blobs", {"partition": "natural", "clients": 5}, r"data.clients = 5, but .* has 4 natural devices"),
        ("tiny_device", {"partition": "natural"}, r"1 of 2 devices .* fewer than data.min_examples = 2 .*smallest: 1"),
        ("blobs", {"partition": "natural", "local_test_fraction": 0.0}, r"union of the devices' local test splits"),
        ("not_a_dict", {}, r"must return a dict .* got tuple"),
        ("unknown_key", {}, r"unknown \['clients'\]"),
        ("one_dimensional_x", {}, r"'x' must be a non-empty 2-D .* shape \(3,\)"),
        ("float_labels", {}, r"'y' must have an integer dtype, got float64"),
        ("negative_labels", {}, r"labels 'y' must be >= 0"),
        ("length_mismatch", {}, r"'y' must be a 1-D array with one entry per row of 'x' \(3\)"),
        ("nan_inputs", {}, r"'x' has NaN"),
        ("string_inputs", {}, r"'x' must hold real numbers"),
        ("missing_function", {}, r"has no function 'missing_function'"),
    ],
)
def test_bad_custom_datasets_are_explained(import_here, function, kwargs, message):
    with pytest.raises(DataError, match=message):
        load(function, **kwargs)


def test_unimportable_module():
    with pytest.raises(DataError, match=r"cannot import module 'no_such_module_fleetlearn'"):
        load_federated(DataConfig(dataset="no_such_module_fleetlearn:make"), 0)
