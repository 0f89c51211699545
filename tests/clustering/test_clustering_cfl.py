"""CFL: the split rule, the bipartition, the server's candidates, and splitting a planted problem."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fleetlearn.clustering import MASK, Clustering, adjusted_rand_index, bipartition, cosine_similarities, split_criterion
from fleetlearn.clustering.cfl import separation_gap
from fleetlearn.config import load_config
from fleetlearn.data.partition import planted_groups
from fleetlearn.engine import build_coordinator
from fleetlearn.ops import RunStore

from planted import CLIENTS, planted_config


def assignment(state) -> np.ndarray:
    """Each client's cluster from CFL's candidate masks (-1: not a single cluster)."""
    mask = state[MASK].numpy()
    single = (mask > 0) & ((mask & (mask - 1)) == 0)
    return np.where(single, np.log2(np.maximum(mask, 1)).round().astype(np.int64), -1)


def test_cfl_splits_two_planted_groups_into_two_matching_clusters():
    torch.set_num_threads(1)
    coord = build_coordinator(load_config(planted_config("cfl", 2, rounds=10, clusters=4)), store=False)
    summary = coord.run()
    assert summary.records[0].clusters == 1  # CFL starts from one model
    assert summary.records[-1].clusters == 2
    splits = [s for r in summary.records for s in r.extra.get("cfl_splits", [])]
    assert len(splits) == 1 and splits[0]["mean_norm"] < 0.7 and splits[0]["max_norm"] > 2.0
    clusters = assignment(coord.server_state)
    assert (clusters >= 0).all()
    assert adjusted_rand_index(planted_groups(CLIENTS, 2), clusters) == pytest.approx(1.0)
    # The downlink carries the models in use: one before the split, two after.
    d = coord.learner.block_dim
    per_client = [r.downlink_bytes / r.selected for r in summary.records]
    first_two = next(i for i, r in enumerate(summary.records) if r.clusters == 2) + 1
    assert 4 * d <= per_client[0] < 4 * d * 1.01
    assert 8 * d <= per_client[first_two] < 8 * d * 1.01
    # After the split each cluster's model serves its group far better than one model can.
    last = summary.records[-1]
    assert last.fed_accuracy >= last.extra["single_model_fed_accuracy"] + 0.10


def test_cfl_state_survives_checkpoint_and_resume(tmp_path):
    torch.set_num_threads(1)
    # A split in round 1 (loose thresholds) so the resumed part starts with two clusters.
    cfg = planted_config("cfl", 2, rounds=4, clusters=3, cfl_eps1=0.9, cfl_eps2=1.5, cfl_min_gap=-2.0)
    cfg["store"] = {"root": str(tmp_path)}
    full = build_coordinator(load_config(cfg), store=False)
    full.run()
    part = build_coordinator(load_config({**cfg, "server": {**cfg["server"], "rounds": 2}}), store=True)
    first = part.run()
    assert first.records[0].clusters >= 2
    resumed = build_coordinator(load_config(cfg), store=RunStore.open(first.run_dir))
    assert resumed.resume() == 2
    assert resumed.clustering.active(resumed.server_state) == first.records[-1].clusters
    resumed.run()
    torch.testing.assert_close(resumed.params, full.params)
    np.testing.assert_array_equal(resumed.server_state[MASK].numpy(), full.server_state[MASK].numpy())
    assert [r.clusters for r in resumed.records] == [r.clusters for r in full.records]


def test_bipartition_separates_two_directions_and_reports_the_gap():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, generator=gen), torch.randn(50, generator=gen)
    truth = np.array([0, 1] * 6)
    updates = torch.stack([(a if t == 0 else b) + 0.3 * torch.randn(50, generator=gen) for t in truth])
    sim = cosine_similarities(updates)
    np.testing.assert_allclose(np.diag(sim), 1.0, atol=1e-9)
    side = bipartition(sim)
    assert not side[0] and adjusted_rand_index(truth, side) == pytest.approx(1.0)
    intra, cross = separation_gap(sim, side)
    assert intra > cross
    # The split rule's norms: of the weighted mean update, and the largest update.
    mean_norm, max_norm = split_criterion(updates, np.ones(12))
    assert mean_norm == pytest.approx(float(updates.double().mean(0).norm()), rel=1e-9)
    assert max_norm == pytest.approx(float(updates.double().norm(dim=1).max()), rel=1e-9)


def test_cfl_candidates_follow_the_masks():
    part = Clustering("cfl", 4, 3, population=6)
    state = part.init_state()
    state["clustering/active"] = torch.tensor([3])
    state[MASK] = torch.tensor([0, 0b001, 0b010, 0b110, 0b100, 0])
    entry = part.task_entry(state, [0, 1, 3, 5])
    # Unknown clients are not listed: they may pick any active cluster.
    assert entry.model_dump() == {"mode": "cfl", "clusters": 4, "active": 3, "blocks": 3, "candidates": {"1": [0], "3": [1, 2]}}
    allowed = part.allowed(state, np.array([0, 1, 3]))
    assert allowed.tolist() == [[True, True, True, False], [True, False, False, False], [False, True, True, False]]


def test_adjusted_rand_index_matches_known_values():
    assert adjusted_rand_index([0, 0, 1, 1], [5, 5, 2, 2]) == pytest.approx(1.0)
    # Hubert & Arabie: for [0,0,0,1,1,1] vs [0,0,1,1,2,2] the index is 0.24242...
    assert adjusted_rand_index([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]) == pytest.approx(8 / 33)
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = rng.integers(0, 4, 40), rng.integers(0, 3, 40)
        assert adjusted_rand_index(a, b) == pytest.approx(sklearn.adjusted_rand_score(a, b))
