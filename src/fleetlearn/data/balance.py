"""Client-side label-skew helper: random oversampling of under-represented classes.

Under label skew (Dirichlet or shard partitions) a client holds many examples of a few
classes and a handful of the rest, so local SGD all but ignores the rare ones.  Random
oversampling (duplicate minority examples until every class the client has matches its
majority class; the baseline of Buda, Maki & Mazurowski, Neural Networks 2018, and of
SMOTE's paper, Chawla et al., JAIR 2002) rebalances the *local* objective.  It cannot add
classes the client does not have: those stay absent.  Optional Gaussian noise on the
duplicated copies (``noise_std``) is a minimal feature-space augmentation so copies are
not exact repeats.  Opt-in (``[client] oversample``); the client's example count for
aggregation weights should stay the original one.
"""

from __future__ import annotations

import numpy as np


def oversample(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    rng: np.random.Generator,
    noise_std: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(x', y')``: the original rows first, unchanged and in order, then for each class
    ``c`` the client has (count ``n_c > 0``) ``max_c n_c - n_c`` rows drawn uniformly with
    replacement from that class's rows (plus ``N(0, noise_std^2)`` noise per feature, if set).

    Afterwards every present class has exactly ``max_c n_c`` rows.  Vectorised: one draw of
    offsets for all copies.  ``x`` is ``(N, ...)`` with floating features (any trailing shape),
    ``y`` is ``(N,)`` integer labels in ``[0, num_classes)``.
    """
    x = np.asarray(x)
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"oversample: y must be 1-D, got shape {y.shape}")
    if x.ndim < 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"oversample: x has shape {x.shape}, y {y.shape}; they need one row per label")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"oversample: y must hold integer labels, got dtype {y.dtype}")
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"oversample: num_classes must be an integer >= 1, got {num_classes!r}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"oversample: labels must be in [0, {num_classes}), found [{y.min()}, {y.max()}]")
    if not (noise_std >= 0 and np.isfinite(noise_std)):
        raise ValueError(f"oversample: noise_std must be a finite number >= 0, got {noise_std!r}")
    if noise_std > 0 and not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"oversample: noise_std > 0 needs floating features, x has dtype {x.dtype}")
    if y.size == 0:
        return x.copy(), y.copy()

    counts = np.bincount(y, minlength=num_classes)
    need = np.where(counts > 0, counts.max() - counts, 0)  # copies to add per class
    total = int(need.sum())
    if total == 0:
        return x.copy(), y.copy()
    # Rows grouped by class: class c's rows are by_class[starts[c] : starts[c] + counts[c]].
    by_class = np.argsort(y, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    copy_class = np.repeat(np.arange(num_classes), need)
    offsets = rng.integers(0, counts[copy_class])
    src = by_class[starts[copy_class] + offsets]
    extra_x = x[src]
    if noise_std > 0:
        extra_x = extra_x + rng.normal(0.0, noise_std, size=extra_x.shape).astype(x.dtype)
    return np.concatenate([x, extra_x]), np.concatenate([y, y[src]])
