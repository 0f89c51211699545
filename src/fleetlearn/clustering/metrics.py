"""Agreement between two clusterings, in numpy (scikit-learn's metric, without needing it)."""

from __future__ import annotations

import numpy as np


def _pairs(counts: np.ndarray) -> float:
    counts = counts.astype(np.float64)
    return float((counts * (counts - 1) / 2).sum())


def adjusted_rand_index(truth, predicted) -> float:
    """Hubert & Arabie's adjusted Rand index (J. Classification 1985): 1 for identical
    partitions (labels may be renamed), about 0 for independent ones.

    ARI = (sum_ij C(n_ij, 2) - E) / (0.5 (sum_i C(a_i, 2) + sum_j C(b_j, 2)) - E),
    E = sum_i C(a_i, 2) sum_j C(b_j, 2) / C(n, 2), from the contingency table n_ij."""
    a = np.asarray(truth)
    b = np.asarray(predicted)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"two label arrays of one length are needed, got shapes {a.shape} and {b.shape}")
    n = a.size
    if n < 2:
        return 1.0
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1), dtype=np.int64)
    np.add.at(table, (ai, bi), 1)
    index = _pairs(table)
    rows, cols = _pairs(table.sum(1)), _pairs(table.sum(0))
    expected = rows * cols / (n * (n - 1) / 2)
    top = (rows + cols) / 2
    if top == expected:  # both partitions trivial (one cluster each, or all singletons)
        return 1.0
    return (index - expected) / (top - expected)
