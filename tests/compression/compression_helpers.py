"""Shared strategies and helpers for the compression tests."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fleetlearn.compression import wire
from fleetlearn.compression.sparsify import read_support


def vectors(max_dim: int = 700, bound: float = 1e4, min_dim: int = 0, subnormal: bool = True):
    """Finite float32 vectors of mixed magnitudes, with zeros, ties and subnormals."""
    elems = st.one_of(
        st.floats(-bound, bound, width=32, allow_nan=False, allow_subnormal=subnormal),
        st.sampled_from([0.0, 1.0, -1.0, 0.5]),
    )
    return hnp.arrays(np.float32, st.integers(min_dim, max_dim), elements=elems).map(torch.from_numpy)


def kept_indices(payload: bytes) -> np.ndarray:
    """The sorted indices a sparse payload carries, read from the wire."""
    h, r = wire.read_header(payload)
    assert h.support in (wire.SUPPORT_TOPK, wire.SUPPORT_RANDK, wire.SUPPORT_TOPK_BLOCKS)
    return read_support(r, h.support, h.dim)


def heavy_tailed(d: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy((rng.standard_t(3, size=d) * 1e-2).astype(np.float32))
