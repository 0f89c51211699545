"""Hierarchical aggregation: with the mean, regions -> root equals flat FedAvg."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fleetlearn.aggregation import MeanAggregator
from fleetlearn.config import load_config
from fleetlearn.engine.factory import build_coordinator
from fleetlearn.engine.hierarchy import Hierarchy, RegionMap, build_hierarchy, combine, regional_mean


def _cohort(n=57, d=301, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, d, generator=g)
    w = torch.rand(n, generator=g, dtype=torch.float64) * 50 + 1
    return m, w


@pytest.mark.parametrize("regions", [1, 3, 8, 100])
def test_regions_then_root_equals_flat_fedavg(regions):
    m, w = _cohort()
    ids = np.random.default_rng(1).integers(0, regions, len(w))
    sums, totals = regional_mean(m, w, ids, regions)
    assert sums.shape == (regions, m.shape[1]) and totals.shape == (regions,)
    flat = MeanAggregator().aggregate(m, w.to(torch.float32))
    torch.testing.assert_close(combine(sums, totals), flat, rtol=0, atol=1e-6)


def test_region_sums_are_the_weighted_sums_of_their_members():
    m, w = _cohort(n=20, d=7)
    ids = np.arange(20) % 4
    sums, totals = regional_mean(m, w, ids, 5)  # region 4 has nobody
    for r in range(5):
        rows = ids == r
        want = (m[torch.from_numpy(rows)].double() * w[torch.from_numpy(rows), None]).sum(0)
        torch.testing.assert_close(sums[r], want)
        assert totals[r].item() == pytest.approx(float(w[torch.from_numpy(rows)].sum()))
    assert totals[4] == 0 and not sums[4].any()


def test_failed_region_drops_exactly_its_clients_and_bytes_count_one_vector_per_region():
    m, w = _cohort(n=40, d=11)
    clients = np.arange(100, 140)
    h = Hierarchy(RegionMap(1000, 4), min_regions=2)
    full = h.aggregate(m, w, clients)
    assert full.bytes_forwarded == 4 * (4 * 11 + 8)
    torch.testing.assert_close(full.mean, MeanAggregator().aggregate(m, w.float()), rtol=0, atol=1e-6)
    failed = np.array([False, True, False, False])
    res = h.aggregate(m, w, clients, failed=failed)
    keep = torch.from_numpy(clients % 4 != 1)
    torch.testing.assert_close(res.mean, MeanAggregator().aggregate(m[keep], w[keep].float()), rtol=0, atol=1e-6)
    assert res.bytes_forwarded == 3 * (4 * 11 + 8)
    assert res.failed_regions == [1] and res.to_metrics()["hierarchy_dropped_updates"] == 10
    np.testing.assert_array_equal(res.kept, keep.numpy())
    with pytest.raises(ValueError, match="1 of 4 regions reported.*min_regions = 2"):
        h.aggregate(m, w, clients, failed=np.array([True, True, False, True]))


def test_seeded_region_map_is_balanced_and_deterministic():
    a = RegionMap(10_001, 7, seed=3, scheme="seeded")
    b = RegionMap(10_001, 7, seed=3, scheme="seeded")
    ids = np.arange(10_001)
    np.testing.assert_array_equal(a(ids), b(ids))
    counts = np.bincount(a(ids), minlength=7)
    assert counts.max() - counts.min() <= 1
    assert a.nbytes() == 2 * 10_001  # int16 per client
    assert not np.array_equal(a(ids), RegionMap(10_001, 7, seed=4, scheme="seeded")(ids))


def test_seeded_region_failures_follow_the_probability():
    h = Hierarchy(RegionMap(100, 10), region_failure=0.3, seed=5)
    fails = np.array([h.failed_regions(r) for r in range(400)])
    assert 0.25 < fails.mean() < 0.35
    np.testing.assert_array_equal(h.failed_regions(17), Hierarchy(RegionMap(100, 10), region_failure=0.3, seed=5).failed_regions(17))


class _Capture:
    def __init__(self):
        self.rounds = []

    def after_round(self, record, coordinator):
        if coordinator.last_updates is not None:
            ids = [c.client_id for c in record.clients if c.status == "accepted"]
            self.rounds.append((coordinator.last_updates, coordinator.last_weights, ids, coordinator.last_aggregate))


def test_hierarchy_on_a_real_round_reproduces_the_engines_fedavg():
    cap = _Capture()
    cfg = load_config({"data": {"clients": 40}, "server": {"rounds": 2, "cohort": 25, "eval_clients": 5}, "client": {"local_epochs": 1}, "monitoring": {"detectors": []}})
    build_coordinator(cfg, store=False, hooks=[cap]).run()
    assert len(cap.rounds) == 2
    h = Hierarchy(RegionMap(40, 6, seed=0, scheme="seeded"))
    for matrix, weights, ids, aggregate in cap.rounds:
        res = h.aggregate(matrix, weights.double(), ids)
        torch.testing.assert_close(res.mean, aggregate, rtol=0, atol=1e-6)
        assert res.region_counts.sum() == len(ids)


def test_build_hierarchy_from_the_engine_section():
    flat = load_config({})
    assert build_hierarchy(flat.engine, 100, 0) is None
    cfg = load_config({"engine": {"regions": 5, "min_regions": 3, "region_failure": 0.1}})
    h = build_hierarchy(cfg.engine, 100, 0)
    assert (h.regions.regions, h.min_regions, h.region_failure) == (5, 3, 0.1)
    np.testing.assert_array_equal(h.regions(np.arange(10)), np.arange(10) % 5)


def _engine_cfg(**engine):
    return load_config({
        "data": {"clients": 40}, "server": {"rounds": 3, "cohort": 20, "eval_clients": 5},
        "client": {"local_epochs": 1}, "engine": engine,
    })


def test_engine_regions_give_the_flat_model_and_record_the_forwarded_bytes():
    flat = build_coordinator(_engine_cfg(), store=False)
    flat.run()
    tree = build_coordinator(_engine_cfg(regions=4), store=False)
    summary = tree.run()
    torch.testing.assert_close(tree.params, flat.params, rtol=0, atol=1e-5)
    rec = summary.records[-1]
    assert rec.extra["hierarchy_regions"] == 4 and rec.extra["hierarchy_regions_reporting"] == 4
    assert rec.extra["hierarchy_bytes_forwarded"] == 4 * (4 * tree.dim + 8)


def test_a_failed_region_loses_exactly_its_clients_and_the_run_goes_on():
    coord = build_coordinator(_engine_cfg(regions=4, region_failure=0.5), store=False)
    summary = coord.run()
    lost_any = False
    for rec in summary.records:
        failed = rec.extra.get("hierarchy_failed_regions", [])
        lost = [c for c in rec.clients if c.reason.startswith("region ")]
        assert all(c.status == "dropped" and c.client_id % 4 in failed for c in lost)
        assert rec.accepted == sum(c.status == "accepted" for c in rec.clients)
        if rec.status == "ok":
            assert all(c.client_id % 4 not in failed for c in rec.clients if c.status == "accepted")
            assert sum(c.weight for c in rec.clients) == pytest.approx(1.0)
        lost_any |= bool(lost)
    assert lost_any  # with p = 0.5 per region and 3 rounds, seed 0 loses some region


def test_too_few_regions_fail_the_round_and_leave_the_model():
    coord = build_coordinator(_engine_cfg(regions=4, min_regions=4, region_failure=1.0), store=False)
    before = coord.params.clone()
    summary = coord.run()
    assert all(r.status == "failed" and r.reason.startswith("hierarchy: 0 of 4 regions reported") for r in summary.records)
    torch.testing.assert_close(coord.params, before)


def test_regions_refuse_a_robust_aggregator():
    from fleetlearn.config import ConfigError

    cfg = load_config({"data": {"clients": 40}, "server": {"cohort": 20, "aggregator": "median"}, "engine": {"regions": 4}})
    with pytest.raises(ConfigError, match="engine.regions = 4: server.aggregator = 'median'"):
        build_coordinator(cfg, store=False)
