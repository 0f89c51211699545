"""Hierarchical aggregation, simulated: clients -> regional aggregators -> root.

Each region pre-aggregates the accepted updates of its own clients into one
weighted sum and one total weight, and forwards only that pair to the root,
which divides the sum of the regional sums by the sum of the regional weights.
For the weighted mean this is exactly flat FedAvg (McMahan et al., AISTATS 2017,
Alg. 1):  sum_r sum_{i in r} w_i u_i / sum_r sum_{i in r} w_i = sum_i w_i u_i / sum_i w_i,
so only the summation order changes (sums are kept in float64 to make that
immaterial).  Robust rules (median, Krum, ...) do not decompose this way; a
hierarchy is only offered with the `mean` aggregator.

The region->root traffic is one vector per reporting region (plus its weight),
whatever the number of clients: that, and containing a region's failure, is what
the hierarchy buys.  See docs/multi-region.md for the deployment it simulates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

ROW_BLOCK = 4096  # rows weighted at a time: bounds the (block, d) temporary of the weighted fold


def regional_mean(matrix: torch.Tensor, weights, region_ids, regions: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-region weighted sums of the rows of `matrix` and per-region total weights.

    `matrix` (n, d), `weights` (n,) non-negative, `region_ids` (n,) ints in [0, regions).
    Returns ``(region_sums (R, d) float64, region_weights (R,) float64)``: what each
    regional aggregator forwards.  One `index_add_` per block of rows, no loop over
    regions or clients.
    """
    if matrix.ndim != 2:
        raise ValueError(f"matrix must be (n, d), got shape {tuple(matrix.shape)}")
    n, d = matrix.shape
    w = torch.as_tensor(np.asarray(weights, dtype=np.float64) if not torch.is_tensor(weights) else weights, dtype=torch.float64)
    ids = torch.as_tensor(np.asarray(region_ids) if not torch.is_tensor(region_ids) else region_ids, dtype=torch.int64)
    if w.shape != (n,) or ids.shape != (n,):
        raise ValueError(f"weights and region_ids must have shape ({n},), got {tuple(w.shape)} and {tuple(ids.shape)}")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError("weights must be finite and non-negative")
    r = int(regions) if regions is not None else (int(ids.max()) + 1 if n else 0)
    if n and (int(ids.min()) < 0 or int(ids.max()) >= r):
        raise ValueError(f"region ids must lie in [0, {r}), got [{int(ids.min())}, {int(ids.max())}]")
    sums = torch.zeros(r, d, dtype=torch.float64, device=matrix.device)
    for lo in range(0, n, ROW_BLOCK):
        blk = slice(lo, lo + ROW_BLOCK)
        sums.index_add_(0, ids[blk].to(matrix.device), matrix[blk].to(torch.float64) * w[blk, None].to(matrix.device))
    totals = torch.zeros(r, dtype=torch.float64).index_add_(0, ids, w)
    return sums, totals


def combine(region_sums: torch.Tensor, region_weights: torch.Tensor, reporting=None) -> torch.Tensor:
    """The root's step: sum of regional sums over sum of regional weights, (d,) float32.

    `reporting` (R,) bool selects the regions whose forward reached the root (default:
    every region with positive weight); the others' contribution is dropped."""
    w = region_weights.to(torch.float64)
    keep = w > 0 if reporting is None else torch.as_tensor(reporting, dtype=torch.bool) & (w > 0)
    total = w[keep].sum()
    if not keep.any() or total <= 0:
        raise ValueError("no region reported a positive weight")
    return (region_sums[keep.to(region_sums.device)].sum(0) / total).to(torch.float32)


class RegionMap:
    """Which region each client belongs to, O(1) memory per client.

    ``scheme="modulo"``: region = client id mod R (no state at all).
    ``scheme="seeded"``: a seeded balanced assignment (a permutation of the ids cut into
    R near-equal groups), stored as one small int per client."""

    def __init__(self, population: int, regions: int, seed: int = 0, scheme: str = "modulo"):
        if regions < 1:
            raise ValueError(f"regions must be >= 1, got {regions}")
        if scheme not in ("modulo", "seeded"):
            raise ValueError(f"unknown region scheme {scheme!r}; allowed: modulo, seeded")
        self.population, self.regions, self.scheme = int(population), int(regions), scheme
        self._table: np.ndarray | None = None
        if scheme == "seeded":
            dtype = np.int16 if regions <= np.iinfo(np.int16).max else np.int32
            perm = np.random.default_rng([seed, 0x2E610]).permutation(population)
            table = np.empty(population, dtype=dtype)
            table[perm] = np.arange(population) % regions
            self._table = table

    def __call__(self, clients) -> np.ndarray:
        c = np.asarray(clients, dtype=np.int64)
        return (c % self.regions) if self._table is None else self._table[c].astype(np.int64)

    def nbytes(self) -> int:
        return 0 if self._table is None else int(self._table.nbytes)


@dataclass
class HierarchyResult:
    mean: torch.Tensor  # (d,) float32: what the root hands to the server optimizer
    region_sums: torch.Tensor  # (R, d) float64
    region_weights: torch.Tensor  # (R,) float64
    region_counts: np.ndarray  # (R,) accepted updates per region
    reporting: np.ndarray  # (R,) bool: the region had updates and its forward reached the root
    kept: np.ndarray  # (n,) bool: rows whose region reported (the others' work was lost)
    bytes_forwarded: int  # region -> root: one float32 vector + one float64 weight per reporting region
    failed_regions: list[int] = field(default_factory=list)

    def to_metrics(self) -> dict:
        return {
            "hierarchy_regions": int(len(self.region_weights)),
            "hierarchy_regions_reporting": int(self.reporting.sum()),
            "hierarchy_failed_regions": list(self.failed_regions),
            "hierarchy_dropped_updates": int((~self.kept).sum()),
            "hierarchy_bytes_forwarded": int(self.bytes_forwarded),
        }


class Hierarchy:
    """Simulated two-level aggregation for the weighted mean.

    `region_failure` is the probability that a region's aggregator fails in a round
    (seeded by (seed, round)); a failed region's accepted updates never reach the
    root.  The root needs at least `min_regions` reporting regions, else it raises
    ValueError (the Coordinator turns that into a failed round, model unchanged)."""

    name = "hierarchy"

    def __init__(self, regions: RegionMap, min_regions: int = 1, region_failure: float = 0.0, seed: int = 0):
        if not 1 <= min_regions <= regions.regions:
            raise ValueError(f"min_regions must be in [1, {regions.regions}], got {min_regions}")
        if not 0.0 <= region_failure <= 1.0:
            raise ValueError(f"region_failure must be in [0, 1], got {region_failure}")
        self.regions, self.min_regions, self.region_failure, self.seed = regions, int(min_regions), float(region_failure), int(seed)

    def failed_regions(self, round: int) -> np.ndarray:
        """(R,) bool: regions whose aggregator fails this round (seeded, independent of the cohort)."""
        if self.region_failure <= 0:
            return np.zeros(self.regions.regions, dtype=bool)
        return np.random.default_rng([self.seed, round, 0x2E61F]).random(self.regions.regions) < self.region_failure

    def aggregate(self, matrix: torch.Tensor, weights, clients: Sequence[int], round: int = 0, failed=None) -> HierarchyResult:
        """Regional pre-aggregation of the accepted updates, then the root's combine.

        `failed` (R,) bool overrides the seeded failures (tests, fault injection)."""
        n, d = matrix.shape
        if len(clients) != n:
            raise ValueError(f"{len(clients)} client ids for {n} updates")
        r = self.regions.regions
        ids = self.regions(clients)
        sums, totals = regional_mean(matrix, weights, ids, r)
        counts = np.bincount(ids, minlength=r)
        down = np.asarray(self.failed_regions(round) if failed is None else failed, dtype=bool)
        reporting = (counts > 0) & ~down & (totals.numpy() > 0)
        if int(reporting.sum()) < self.min_regions:
            raise ValueError(
                f"{int(reporting.sum())} of {r} regions reported (failed: {np.flatnonzero(down & (counts > 0)).tolist()}), "
                f"fewer than min_regions = {self.min_regions}"
            )
        return HierarchyResult(
            mean=combine(sums, totals, torch.from_numpy(reporting)),
            region_sums=sums,
            region_weights=totals,
            region_counts=counts,
            reporting=reporting,
            kept=reporting[ids],
            bytes_forwarded=int(reporting.sum()) * (4 * d + 8),
            failed_regions=np.flatnonzero(down & (counts > 0)).tolist(),
        )


def build_hierarchy(engine, population: int, seed: int) -> Hierarchy | None:
    """The `[engine] regions / min_regions / region_failure` settings as a Hierarchy
    (None for a flat run, regions = 1).  Regions by client id (`RegionMap` "modulo")."""
    if engine.regions <= 1:
        return None
    return Hierarchy(
        RegionMap(population, engine.regions, seed=seed), min_regions=engine.min_regions,
        region_failure=engine.region_failure, seed=seed,
    )
