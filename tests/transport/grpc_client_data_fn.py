"""A client's private data, loaded by import path (for the local-data test)."""

import numpy as np


def local_blobs(n: int = 12):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(n, 4)).astype(np.float64)
    y = (x[:, 0] > 0).astype(np.int32)
    return x[:8], y[:8], x[8:], y[8:]


def not_four():
    return 1, 2
