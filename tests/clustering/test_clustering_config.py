"""Clustered-FL configuration: bad values are ConfigErrors naming the key; the wire tag."""

from __future__ import annotations

import pytest
import torch

from fleetlearn.compression import parse_chain
from fleetlearn.compression.blocks import HEADER_BYTES, decode_block, encode_block, read_block_header
from fleetlearn.config import ConfigError, load_config
from fleetlearn.params import PayloadError


@pytest.mark.parametrize(
    "server, extra, needle",
    [
        ({"clustering": "kmeans"}, {}, "server.clustering = 'kmeans'"),
        ({"clustering": "ifca", "clusters": 1}, {}, "server.clusters >= 2"),
        ({"clustering": "ifca", "clusters": 63}, {}, "server.clusters = 63"),
        ({"clustering": "cfl", "cfl_eps1": 2.0, "cfl_eps2": 1.0}, {}, "server.cfl_eps1 = 2.0"),
        ({"clustering": "ifca", "mode": "async"}, {}, "server.mode = 'async'"),
        ({"clustering": "ifca", "aggregator": "mifa"}, {}, "server.aggregator = 'mifa'"),
        ({"clustering": "cfl"}, {"privacy": {"mode": "central"}}, "privacy.mode = 'central'"),
        ({"clustering": "ifca"}, {"privacy": {"mode": "local"}}, "privacy.mode = 'local'"),
        ({"clustering": "ifca"}, {"engine": {"regions": 2}}, "engine.regions"),
        ({}, {"data": {"clients": 3, "partition": "label_permutation", "groups": 4}}, "data.groups = 4"),
    ],
)
def test_bad_clustering_config_names_the_key(server, extra, needle):
    with pytest.raises(ConfigError, match="invalid config") as err:
        load_config({"server": {"cohort": 3, **server}, "data": {"clients": 10}, **extra})
    assert needle in str(err.value)


def test_label_permutation_plants_groups_on_the_clients():
    from fleetlearn.data import load_federated

    cfg = load_config({"data": {"dataset": "digits", "clients": 9, "partition": "label_permutation", "groups": 3}, "server": {"cohort": 3}})
    plain = load_federated(load_config({"data": {**cfg.data.model_dump(), "partition": "feature", "feature_shift": 0.0}, "server": {"cohort": 3}}).data, 0)
    data = load_federated(cfg.data, 0)
    perms = torch.tensor(data.stats["label_permutations"])
    assert perms.shape == (3, 10) and (perms[0] == torch.arange(10)).all()
    assert len({tuple(p.tolist()) for p in perms}) == 3
    for c in range(9):  # the same examples as an IID split, each client's labels seen through its group's permutation
        rows = torch.from_numpy(data.train_indices(c))
        torch.testing.assert_close(data.x[rows], plain.x[rows])
        assert (data.y[rows] == perms[c % 3][plain.y[rows]]).all()
    assert (data.central_y == plain.central_y).all()  # the central set keeps the original labels


def test_block_payload_round_trip_and_refusals():
    chain = parse_chain("q8")
    full = torch.zeros(3, 100)
    full[2] = torch.linspace(-1, 1, 100)
    payload, _ = encode_block(chain, full.reshape(-1), 2, 3)
    plain, _ = chain.encode(full[2])
    assert len(payload) == len(plain) + HEADER_BYTES  # only the block travels, plus the tag
    assert read_block_header(payload) == (2, 3)
    vec, index = decode_block(chain, payload, 3, 100)
    assert index == 2
    assert torch.count_nonzero(vec[:200]) == 0
    torch.testing.assert_close(vec[200:], chain.decode(plain, dim=100))
    with pytest.raises(PayloadError, match="not a block payload"):
        decode_block(chain, plain, 3, 100)
    with pytest.raises(PayloadError, match="names 3 blocks, the run has 4"):
        decode_block(chain, payload, 4, 100)
    with pytest.raises(PayloadError, match="shorter"):
        read_block_header(payload[:5])


def test_block_error_feedback_residual_does_not_cross_models():
    chain = parse_chain("ef | topk:0.1")
    full = torch.zeros(2, 50)
    full[0] = torch.arange(50.0)
    _, state = encode_block(chain, full.reshape(-1), 0, 2)
    assert state is not None and torch.count_nonzero(state["ef.residual"]) > 0
    other = torch.zeros(2, 50)
    other[1] = torch.ones(50)
    payload, state2 = encode_block(chain, other.reshape(-1), 1, 2, state)
    vec, _ = decode_block(chain, payload, 2, 50)
    # Model 0's residual is not added into model 1's update.
    assert float(vec[50:].max()) <= 1.0 + 1e-6
    assert int(state2["block_index"]) == 1
