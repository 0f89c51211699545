"""Heterogeneity statistics of a partition: sizes and label skew, JSON-serialisable."""

from __future__ import annotations

import numpy as np

# Per-client label histograms are reported up to this many clients (clients x classes ints).
MAX_CLIENTS_FOR_HISTOGRAMS = 1000


def label_skew_per_client(labels: np.ndarray, offsets: np.ndarray, num_classes: int) -> np.ndarray:
    """Total-variation distance between each client's label distribution and the pooled one.

    0 = the client's mix equals the global mix; near 1 = disjoint label sets.  Sparse: only the
    (client, class) pairs present are touched, using TV = (1 + sum_{q_k > 0} (|q_k - p_k| - p_k)) / 2.
    A client with no examples gets NaN.
    """
    sizes = np.diff(offsets)
    num_clients = len(sizes)
    owner = np.repeat(np.arange(num_clients, dtype=np.int64), sizes)
    pooled = np.bincount(labels, minlength=num_classes) / max(len(labels), 1)
    pairs, counts = np.unique(owner * num_classes + labels, return_counts=True)
    client, label = pairs // num_classes, pairs % num_classes
    share = counts / sizes[client]
    total = np.bincount(client, weights=np.abs(share - pooled[label]) - pooled[label], minlength=num_clients)
    with np.errstate(invalid="ignore"):
        return np.where(sizes > 0, 0.5 * (1.0 + total), np.nan)


def heterogeneity_stats(labels: np.ndarray, offsets: np.ndarray, num_classes: int) -> dict:
    """Statistics of the clients' train examples (`labels` ordered by client, segments at `offsets`).

    size_min / size_median / size_max / size_cv (std / mean of sizes), label_skew (mean over
    clients of `label_skew_per_client`), and label_histograms (clients x classes) for at most
    1000 clients, else label_histograms_omitted = true.
    """
    sizes = np.diff(offsets)
    mean_size = sizes.mean()
    stats: dict = {
        "size_min": int(sizes.min()),
        "size_median": float(np.median(sizes)),
        "size_max": int(sizes.max()),
        "size_cv": float(sizes.std() / mean_size) if mean_size > 0 else 0.0,
        "label_skew": float(np.nanmean(label_skew_per_client(labels, offsets, num_classes))) if len(labels) else 0.0,
    }
    if len(sizes) <= MAX_CLIENTS_FOR_HISTOGRAMS:
        owner = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
        histograms = np.bincount(owner * num_classes + labels, minlength=len(sizes) * num_classes)
        stats["label_histograms"] = histograms.reshape(len(sizes), num_classes).tolist()
    else:
        stats["label_histograms_omitted"] = True
    return stats
