"""IFCA end to end on planted clusters (digits with per-group label permutations)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fleetlearn.clustering import adjusted_rand_index
from fleetlearn.config import load_config
from fleetlearn.data.partition import planted_groups
from fleetlearn.engine import build_coordinator
from fleetlearn.ops import RunStore

from planted import CLIENTS, planted_config


def run(cfg: dict, store=False):
    coordinator = build_coordinator(load_config(cfg), store=store)
    return coordinator, coordinator.run()


@pytest.mark.parametrize("groups", [2, 4])
def test_ifca_recovers_planted_clusters_and_beats_one_global_model(groups):
    torch.set_num_threads(1)
    coord, summary = run(planted_config("ifca", groups))
    # Every client's cluster at the end (the evaluator scores all clients with eval_clients = 0).
    ev = coord.evaluator
    truth = planted_groups(CLIENTS, groups)[ev.clients]
    assert adjusted_rand_index(truth, ev.last_choice) >= 0.9
    # The clusters the clients trained in the last round agree too.
    last = summary.records[-1]
    ids = np.array([c.client_id for c in last.clients if c.status == "accepted"])
    trained = np.array([c.cluster for c in last.clients if c.status == "accepted"])
    assert adjusted_rand_index(planted_groups(CLIENTS, groups)[ids], trained) >= 0.9
    _, fedavg = run(planted_config("none", groups))
    clustered_acc, global_acc = last.fed_accuracy, fedavg.records[-1].fed_accuracy
    assert clustered_acc >= global_acc + 0.10, (clustered_acc, global_acc)
    # Within the run, no single one of the k models serves every client as well.
    assert clustered_acc >= last.extra["single_model_fed_accuracy"] + 0.10


def test_ifca_records_clusters_weights_and_honest_bytes(tmp_path):
    torch.set_num_threads(1)
    cfg = planted_config("ifca", 2, rounds=2)
    cfg["store"] = {"root": str(tmp_path)}
    coord, summary = run(cfg, store=True)
    _, plain = run(planted_config("none", 2, rounds=2))
    k, d = 2, coord.learner.block_dim
    for rec, ref in zip(summary.records, plain.records):
        assert rec.clusters == k
        acc = [c for c in rec.clients if c.status == "accepted"]
        clusters = np.array([c.cluster for c in acc])
        assert set(clusters) <= {0, 1}
        assert rec.extra["cluster_sizes"] == np.bincount(clusters, minlength=k).tolist()
        # Aggregation weights are normalised within each cluster.
        w = np.array([c.weight for c in acc])
        for j in np.unique(clusters):
            assert w[clusters == j].sum() == pytest.approx(1.0)
        # Uplink: one block plus its 9-byte tag, i.e. the plain run's update + 9 bytes;
        # downlink: all k models (IFCA sends every model to every selected client).
        plain_up = {c.client_id: c.uplink_bytes for c in ref.clients}
        for c in acc:
            assert c.uplink_bytes == plain_up[c.client_id] + 9
            assert c.downlink_bytes > k * 4 * d
        assert rec.downlink_bytes == pytest.approx(k * ref.downlink_bytes, rel=0.01)
    # The run store keeps each client's cluster and the count.
    stored = RunStore.open(summary.run_dir).records()
    assert [r.clusters for r in stored] == [r.clusters for r in summary.records]
    assert [[c.cluster for c in r.clients] for r in stored] == [[c.cluster for c in r.clients] for r in summary.records]


def test_clustered_aggregator_averages_each_block_over_its_clients():
    from fleetlearn.aggregation import MeanAggregator
    from fleetlearn.clustering import ClusteredAggregator, Clustering

    k, d = 3, 5
    part = Clustering("ifca", k, d, population=10)
    agg = ClusteredAggregator(MeanAggregator(), part)
    gen = torch.Generator().manual_seed(0)
    ids, clusters = [4, 7, 1, 9], [0, 2, 0, 2]
    blocks = torch.randn(4, d, generator=gen)
    matrix = torch.zeros(4, k, d)
    for i, j in enumerate(clusters):
        matrix[i, j] = blocks[i]
        part.tags[ids[i]] = j
    weights = torch.tensor([1.0, 3.0, 3.0, 1.0]) / 8
    out = agg.aggregate_round(ids, matrix.reshape(4, -1), weights).reshape(k, d)
    torch.testing.assert_close(out[0], (1 * blocks[0] + 3 * blocks[2]) / 4)
    torch.testing.assert_close(out[2], (3 * blocks[1] + 1 * blocks[3]) / 4)
    assert torch.count_nonzero(out[1]) == 0  # nobody trained model 1: it stays unchanged


def test_ifca_client_trains_the_lowest_loss_model():
    """The learner's choice is the argmin of the k models' losses on the client's data,
    and only that block of the delta is non-zero."""
    from fleetlearn.learners import FitConfig, TorchLearner
    from fleetlearn.learners.base import ClientData
    from fleetlearn.learners.clustered import ClusteredLearner
    from fleetlearn.learners.models import logistic

    torch.manual_seed(0)
    base = TorchLearner(lambda: logistic(4, 3))
    learner = ClusteredLearner(base, 3)
    params = learner.init_params(0)
    x = torch.randn(30, 4)
    y = torch.randint(0, 3, (30,))
    data = [ClientData(x[i * 10 : (i + 1) * 10], y[i * 10 : (i + 1) * 10], x[:0], y[:0]) for i in range(3)]
    blocks = learner.blocks(params)
    expected = [int(np.argmin([float(base.per_example(blocks[j], c.x, c.y)[0].mean()) for j in range(3)])) for c in data]
    results = learner.fit_cohort(params, data, FitConfig(local_epochs=1, batch_size=5), [1, 2, 3])
    assert [r.cluster for r in results] == expected
    for r in results:
        nz = learner.blocks(r.delta).abs().sum(1) > 0
        assert nz.tolist() == [j == r.cluster for j in range(3)]
    # Candidates restrict the choice (CFL's server assignment).
    forced = learner.fit_cohort(params, data, FitConfig(local_epochs=1, batch_size=5), [1, 2, 3], candidates=[[2], [2], [0, 1]])
    assert [r.cluster for r in forced][:2] == [2, 2] and forced[2].cluster in (0, 1)
