"""Custom datasets for tests/data/test_data_custom.py, loaded by import path."""

import numpy as np


def blobs(seed):
    rng = np.random.default_rng(seed)
    client = np.repeat(np.array([11, 4, 7, 25]), [12, 9, 15, 10])
    y = rng.integers(0, 3, len(client))
    x = rng.normal(size=(len(client), 5)) + y[:, None]
    return {"x": x, "y": y, "client": client}


def no_devices(seed):
    out = blobs(seed)
    del out["client"]
    return out


def tiny_device(seed):
    return {"x": np.zeros((5, 2)), "y": np.array([0, 1, 0, 1, 0]), "client": np.array([0, 0, 0, 0, 1])}


def not_a_dict(seed):
    return np.zeros((3, 2)), np.zeros(3)


def unknown_key(seed):
    return {"x": np.zeros((3, 2)), "y": np.zeros(3, dtype=int), "clients": np.zeros(3, dtype=int)}


def one_dimensional_x(seed):
    return {"x": np.zeros(3), "y": np.zeros(3, dtype=int)}


def float_labels(seed):
    return {"x": np.zeros((3, 2)), "y": np.array([0.0, 1.0, 1.0])}


def negative_labels(seed):
    return {"x": np.zeros((3, 2)), "y": np.array([0, -1, 1])}


def length_mismatch(seed):
    return {"x": np.zeros((3, 2)), "y": np.array([0, 1])}


def nan_inputs(seed):
    return {"x": np.array([[0.0, np.nan], [1.0, 1.0]]), "y": np.array([0, 1])}


def string_inputs(seed):
    return {"x": np.array([["a", "b"], ["c", "d"]]), "y": np.array([0, 1])}


def raises(seed):
    raise RuntimeError("the dataset server is down")


def exits(seed):
    raise SystemExit(0)


def beyond_float32(seed):
    out = no_devices(seed)
    out["x"] = out["x"] * 1e300  # finite in float64, infinite in float32
    return out


def huge_label(seed):
    out = no_devices(seed)
    out["y"][0] = 100_000  # a 100001-class model for 46 examples
    return out
