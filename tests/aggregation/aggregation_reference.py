"""Independent reference implementations, written with explicit loops over plain
numpy/Python so they share no code with fleetlearn.aggregation.robust."""

from __future__ import annotations

import math

import numpy as np


def ref_trimmed_mean(x: np.ndarray, k: int) -> np.ndarray:
    n, d = x.shape
    out = np.empty(d)
    for j in range(d):
        col = sorted(float(v) for v in x[:, j])
        kept = col[k : n - k]
        out[j] = sum(kept) / len(kept)
    return out


def ref_sq_dist(a: np.ndarray, b: np.ndarray) -> float:
    return float(sum((float(p) - float(q)) ** 2 for p, q in zip(a, b)))


def ref_krum_scores(x: np.ndarray, f: int, rows: list[int] | None = None, k: int | None = None) -> dict[int, float]:
    """score(i) = sum of the k smallest squared distances from row i to the other rows in `rows`."""
    rows = list(range(len(x))) if rows is None else rows
    k = len(rows) - f - 2 if k is None else k
    scores = {}
    for i in rows:
        dists = sorted(ref_sq_dist(x[i], x[j]) for j in rows if j != i)
        scores[i] = sum(dists[:k])
    return scores


def ref_krum(x: np.ndarray, f: int, m: int = 1) -> np.ndarray:
    scores = ref_krum_scores(x, f)
    best = sorted(scores, key=lambda i: (scores[i], i))[:m]
    return np.mean([x[i].astype(np.float64) for i in best], axis=0)


def ref_bulyan(x: np.ndarray, f: int) -> np.ndarray:
    n, d = x.shape
    theta, beta = n - 2 * f, n - 4 * f
    remaining, selected = list(range(n)), []
    while len(selected) < theta:
        if len(remaining) == 1:
            pick = remaining[0]
        else:
            k = min(max(len(remaining) - f - 2, 1), len(remaining) - 1)
            scores = ref_krum_scores(x, f, remaining, k)
            pick = min(remaining, key=lambda i: (scores[i], i))
        selected.append(pick)
        remaining.remove(pick)
    s = x[selected].astype(np.float64)
    out = np.empty(d)
    for j in range(d):
        med = float(np.median(s[:, j]))
        closest = sorted(s[:, j], key=lambda v: abs(v - med))[:beta]
        out[j] = sum(closest) / beta
    return out


def ref_geometric_median(x: np.ndarray, w: np.ndarray | None = None, iters: int = 2000) -> np.ndarray:
    """Plain Weiszfeld in float64 with a tiny floor on distances."""
    x = x.astype(np.float64)
    w = np.ones(len(x)) if w is None else np.asarray(w, dtype=np.float64)
    v = (w[:, None] * x).sum(0) / w.sum()
    for _ in range(iters):
        num, den = np.zeros_like(v), 0.0
        for i in range(len(x)):
            dist = max(math.sqrt(ref_sq_dist(x[i], v)), 1e-12)
            num += w[i] * x[i] / dist
            den += w[i] / dist
        v = num / den
    return v


def gm_objective(x: np.ndarray, v: np.ndarray, w: np.ndarray | None = None) -> float:
    w = np.ones(len(x)) if w is None else np.asarray(w, dtype=np.float64)
    return float(sum(w[i] * math.sqrt(ref_sq_dist(x[i], v)) for i in range(len(x))))


def ref_norm_bounded_mean(x: np.ndarray, max_norm: float, w: np.ndarray | None = None) -> np.ndarray:
    w = np.ones(len(x)) if w is None else np.asarray(w, dtype=np.float64)
    rows = []
    for i in range(len(x)):
        row = x[i].astype(np.float64)
        norm = math.sqrt(ref_sq_dist(row, np.zeros_like(row)))
        rows.append(row * (max_norm / norm) if norm > max_norm else row)
    return sum(wi * r for wi, r in zip(w, rows)) / w.sum()


def ref_centered_clipping(x: np.ndarray, tau: float, iters: int, center=None) -> np.ndarray:
    n, d = x.shape
    v = np.zeros(d) if center is None else np.asarray(center, dtype=np.float64).copy()
    for _ in range(iters):
        step = np.zeros(d)
        for i in range(n):
            diff = x[i].astype(np.float64) - v
            norm = math.sqrt(float(diff @ diff))
            step += diff * (min(1.0, tau / norm) if norm > 0 else 1.0)
        v = v + step / n
    return v
