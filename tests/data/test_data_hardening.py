"""Custom datasets that used to crash, exit or be silently accepted (Hardening items 15-17)."""

from pathlib import Path

import pytest

import fleetlearn
from fleetlearn.config import DataConfig
from fleetlearn.data import DataError, load_federated


@pytest.fixture
def import_here(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


def load(function, **kwargs):
    return load_federated(DataConfig(dataset=f"tiny_federated_dataset:{function}", **kwargs), 0)


@pytest.mark.parametrize("function,message", [
    ("raises", r"data.dataset = 'tiny_federated_dataset:raises': the dataset function raised RuntimeError: the dataset server is down; expected"),
    ("exits", r"the dataset function called exit \(0\)"),
])
def test_item15_a_dataset_function_that_raises_or_exits_is_named(import_here, function, message):
    with pytest.raises(DataError, match=message):
        load(function, partition="iid", clients=3)


def test_item15_sys_exit_as_a_dataset_is_an_error_not_a_silent_exit():
    with pytest.raises(DataError, match=r"data.dataset = 'sys:exit': the dataset function called exit"):
        load_federated(DataConfig(dataset="sys:exit"), 0)


def test_item16_values_beyond_float32_are_refused(import_here):
    with pytest.raises(DataError, match=r"'x' has values up to \S+e\+300, beyond float32 \(the models' precision, at most 3.4e\+38\)"):
        load("beyond_float32", partition="iid", clients=3)


def test_item16_the_class_count_is_bounded_by_the_data(import_here):
    with pytest.raises(DataError, match=r"largest label is 100000, which asks for a 100001-class model, but there are only 46 examples"):
        load("huge_label", partition="iid", clients=3)


def test_item17_data_errors_are_config_errors(import_here):
    with pytest.raises(fleetlearn.ConfigError):
        load("raises", partition="iid", clients=3)
    assert issubclass(DataError, fleetlearn.FleetlearnError)
