"""Regional aggregators over gRPC: which region a client belongs to, what a region
forwards to the root, and how the root reads it (`engine.region_aggregators = true`).

The maths is the simulated hierarchy's (engine/hierarchy.py): a region pre-aggregates
its accepted updates into one float64 weighted sum ``S_r = sum_i w_i u_i`` and its total
weight ``W_r = sum_i w_i`` (`regional_mean`), and the root divides the sum of the
reporting regions' sums by the sum of their weights (`combine`).  For the weighted mean
this is flat FedAvg up to the summation order; no other rule decomposes this way.

- Regions by client id, as in the simulation: client ``c`` belongs to region
  ``c mod engine.regions`` (`RegionMap`, "modulo"); a `fleetlearn aggregator` refuses the
  clients of other regions at registration (`RegionMembership`).
- A region's forward (`pack_region_sum`): ``dim`` float64 values of ``S_r`` then ``W_r``
  as one float64, little-endian, under the pseudo-codec ``"region_sum"``; its
  `UpdateMeta.region` repeats the region id and weight and counts the region's clients
  and their bytes (the first hop).
- At the root: `RegionSumDecoder` checks a forward and hands the intake the regional
  mean ``S_r / W_r`` (what the validators and the update-norm records see);
  `RegionSumStage` combines the forwards in float64 and fails the round (model
  unchanged) below ``engine.min_regions``; `RegionRecords` writes each round's regions
  into the record under the simulation's ``hierarchy_*`` keys, with the reason of every
  region that did not report.
"""

from __future__ import annotations


import numpy as np
import torch

from ..aggregation.pipeline import Batch, Stage, StageResult
from ..transport.grpc.regions import (REGION_FEATURE, REGION_SUM_CODEC, pack_region_sum, region_report, region_sum_bytes,
                                      unpack_region_sum)
from .hierarchy import RegionMap, combine
from .intake import UpdateDecoder

__all__ = ["REGION_FEATURE", "REGION_SUM_CODEC", "RegionMembership", "RegionRecords", "RegionSumDecoder", "RegionSumStage",
           "pack_region_sum", "region_report", "region_sum_bytes", "unpack_region_sum"]

class RegionMembership:
    """Which clients a region's aggregator serves: those whose id maps to `region`."""

    def __init__(self, region: int, regions: int):
        if not 0 <= region < regions:
            raise ValueError(f"region {region} does not exist: the run has engine.regions = {regions} (regions 0 to {regions - 1})")
        self.region, self.map = int(region), RegionMap(0, int(regions))

    def region_of(self, client_id: int) -> int:
        return int(self.map([client_id])[0])

    def refusal(self, client_id: int) -> str | None:
        """Why this aggregator does not serve `client_id` (None when it does)."""
        theirs = self.region_of(client_id)
        if theirs == self.region:
            return None
        return (f"client {client_id} belongs to region {theirs} (client id mod engine.regions = {self.map.regions}); this "
                f"aggregator serves region {self.region}: dial region {theirs}'s aggregator")


# -- the root's side -----------------------------------------------------------------------------
class RegionSumDecoder(UpdateDecoder):
    """A region's forward -> its regional mean ``S_r / W_r`` as the intake's float32 row
    (validators, update norms); the stage reads the float64 sum from the payload itself.
    The intake's batch decode (`decode_many`) calls `decode_into` per forward (no dense
    shortcut: a forward is a float64 sum, not an uplink payload)."""

    measures_norm = True

    def __init__(self, dim: int):
        super().__init__(None, dim)

    def decode(self, update) -> torch.Tensor:
        total, weight = unpack_region_sum(update.payload, self.dim)
        return torch.from_numpy(total / weight).to(torch.float32)

    def decode_into(self, update, out: torch.Tensor) -> torch.Tensor:
        total, weight = unpack_region_sum(update.payload, self.dim)
        return out.copy_(torch.from_numpy(total / weight))

    def on_accept(self, update, rec) -> None:
        pass

    def raw_uplink_bytes(self, records) -> int:
        return sum(r.accepted + r.rejected + r.late for r in records) * 4 * self.dim


class RegionSumStage(Stage):
    """The root's aggregation: ``sum_r S_r / sum_r W_r`` over the regions whose forward was
    accepted, in float64 (`hierarchy.combine`); fewer than `min_regions` fail the round."""

    name = "region_sums"

    def __init__(self, regions: int, min_regions: int, dim: int):
        self.regions, self.min_regions, self.dim = int(regions), int(min_regions), int(dim)

    @property
    def label(self) -> str:
        return "regional aggregation"

    def next(self, batch: Batch) -> StageResult:
        n = len(batch.payloads)
        if n < self.min_regions:
            raise ValueError(f"{n} of {self.regions} regions reported, fewer than engine.min_regions = {self.min_regions}")
        sums = np.empty((n, self.dim), dtype=np.float64)
        weights = np.empty(n, dtype=np.float64)
        for i, payload in enumerate(batch.payloads):  # one row per region (a handful), each one vector copy
            sums[i], weights[i] = unpack_region_sum(payload, self.dim)
        return StageResult(combine(torch.from_numpy(sums), torch.from_numpy(weights)),
                           {"hierarchy_region_weights": [float(w) for w in weights]})


class RegionRecords:
    """A round hook: the round's regions into its record, under the simulation's keys
    (``hierarchy_regions``, ``hierarchy_regions_reporting``, ``hierarchy_failed_regions``,
    ``hierarchy_bytes_forwarded``), plus each failed region's reason
    (``hierarchy_region_failures``) and the first hop's clients and bytes as the regions
    reported them (``hierarchy_clients``, ``hierarchy_client_uplink_bytes``,
    ``hierarchy_client_downlink_bytes``).  A region that did not report: its aggregator
    dropped (missed heartbeats, disconnected, missed the deadline), its forward was
    refused, or no aggregator of it was connected when the round was dispatched."""

    def __init__(self, transport, regions: int):
        self.transport, self.regions = transport, int(regions)

    def after_round(self, record, coordinator) -> None:
        of = self.transport.aggregator_regions()  # aggregator client id -> region
        reports = self.transport.region_reports(record.round)  # aggregator client id -> its UpdateMeta.region
        reporting, failures = [], {}
        for rec in record.clients:
            region = of.get(rec.client_id)
            if region is None:
                continue
            if rec.status == "accepted":  # its forward reached the root (the round may still fail: min_regions)
                reporting.append(region)
            else:
                failures[region] = f"{rec.status}: {rec.reason}"
        for region in range(self.regions):
            if region not in reporting and region not in failures:
                failures[region] = "no aggregator of this region was connected when the round was dispatched"
        sent = [reports[c] for c in reports if c in of]
        accepted_ids = {rec.client_id for rec in record.clients if rec.status == "accepted"}
        record.extra.update({
            "hierarchy_regions": self.regions,
            "hierarchy_regions_reporting": len(reporting),
            "hierarchy_failed_regions": sorted(failures),
            "hierarchy_region_failures": {str(r): why for r, why in sorted(failures.items())},
            "hierarchy_bytes_forwarded": int(sum(rec.uplink_bytes for rec in record.clients if rec.client_id in accepted_ids)),
            "hierarchy_clients": int(sum(r["clients"] for r in sent)),
            "hierarchy_client_uplink_bytes": int(sum(r["client_uplink_bytes"] for r in sent)),
            "hierarchy_client_downlink_bytes": int(sum(r["client_downlink_bytes"] for r in sent)),
        })
