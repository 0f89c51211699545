"""The wire format of a regional aggregator's forward to its root (engine/regions.py,
`fleetlearn aggregator`): ``dim`` float64 values of the region's weighted sum ``S_r``
then its total weight ``W_r`` as one float64, little-endian, under the pseudo-codec
``"region_sum"``; `UpdateMeta.region` repeats the region and weight and counts the
region's clients and their bytes.  A transport-level module: the server checks
forwards with it without importing the engine."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ...params import PayloadError

REGION_FEATURE = "region"  # Capabilities.features of a `fleetlearn aggregator` registering with its root
REGION_SUM_CODEC = "region_sum"  # UpdateMeta.codec of a region's forward


def region_sum_bytes(dim: int) -> int:
    """The size of a region's forward for a model of `dim` parameters."""
    return 8 * (int(dim) + 1)


def pack_region_sum(total: torch.Tensor, weight: float) -> bytes:
    """``S_r`` ((dim,) float64) and ``W_r`` as the forward's payload."""
    s = total.detach().to(torch.float64).cpu().numpy().astype("<f8", copy=False)
    return s.tobytes() + np.array([weight], dtype="<f8").tobytes()


def unpack_region_sum(payload: bytes, dim: int) -> tuple[np.ndarray, float]:
    """(``S_r`` (dim,) float64, ``W_r``) of a forward; PayloadError naming what is wrong."""
    if len(payload) != region_sum_bytes(dim):
        raise PayloadError(f"a region's sum for a model of {dim} parameters is {region_sum_bytes(dim)} bytes, got {len(payload)}")
    values = np.frombuffer(payload, dtype="<f8")
    bad = int((~np.isfinite(values[:dim])).sum())
    if bad:
        raise PayloadError(f"the region's sum has {bad} non-finite values (NaN or infinite)")
    weight = float(values[dim])
    if not (math.isfinite(weight) and weight > 0):
        raise PayloadError(f"the region's total weight is {weight!r}; it must be a finite number > 0")
    return values[:dim], weight


def region_report(meta: Any) -> dict[str, Any]:
    """`UpdateMeta.region` as a plain dict (what the root keeps per round)."""
    return {"region": int(meta.region), "weight": float(meta.weight), "clients": int(meta.clients),
            "selected": int(meta.selected), "client_uplink_bytes": int(meta.client_uplink_bytes),
            "client_downlink_bytes": int(meta.client_downlink_bytes), "dropped": int(meta.dropped)}
