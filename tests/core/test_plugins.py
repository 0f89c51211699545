"""A new robust aggregator and a new codec stage, defined here, registered the documented way
(`register_aggregator`, `register_codec`) and run by name from a TOML config: no other file
is edited."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fleetlearn
from fleetlearn.aggregation import AGGREGATORS, register_aggregator
from fleetlearn.compression import CODECS, Sparsifier, decode_payload, parse_chain, register_codec
from fleetlearn.compression import wire
from fleetlearn.config import ConfigError, load_config
from fleetlearn.engine import build_coordinator


class DropLargest:
    """Leave out the update of largest norm, then the weighted mean of the rest."""

    name = "drop_largest"
    needs_individual_updates = True
    config_keys: dict[str, str] = {}

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        x = updates.to(torch.float64)
        w = torch.ones(x.shape[0], dtype=torch.float64) if weights is None else weights.to(torch.float64)
        keep = torch.ones(x.shape[0], dtype=torch.bool)
        if x.shape[0] > 1:
            keep[int(torch.linalg.vector_norm(x, dim=1).argmax())] = False
        return ((w[keep, None] * x[keep]).sum(0) / w[keep].sum()).to(updates.dtype)


class StrideK(Sparsifier):
    """Keep k evenly spaced coordinates from a random offset (a structured random-k); the
    payload is the generic sparse format, so any build decodes it."""

    name = "stridek"
    lossy = True
    stochastic = True
    wire_id = wire.SUPPORT_TOPK

    def select(self, x: torch.Tensor, rng: np.random.Generator | None) -> np.ndarray:
        d = x.numel()
        k = self.k(d)
        step = max(d // k, 1)
        start = int(rng.integers(step)) if rng is not None else 0
        return np.arange(start, d, step, dtype=np.int64)[:k]

    @classmethod
    def from_args(cls, positional, options):
        amount, _ = cls._amount(positional, options)
        return cls(amount)


@pytest.fixture(autouse=True)
def registered():
    register_aggregator(DropLargest)
    register_codec("stridek", StrideK.from_args)
    yield
    AGGREGATORS.pop("drop_largest", None)
    CODECS.pop("stridek", None)


TOML = """
seed = 0
[data]
clients = 20
[model]
hidden = [16]
[server]
rounds = 2
cohort = 6
aggregator = "drop_largest"
[client]
local_epochs = 1
[compression]
uplink = "ef | stridek:0.25 | q8"
"""


def test_a_registered_aggregator_and_codec_run_by_name_from_toml(tmp_path):
    path = tmp_path / "plugins.toml"
    path.write_text(TOML)
    s = fleetlearn.run(path, store=False)
    assert s.rounds == 2 and all(r.status == "ok" for r in s.records)
    assert s.compression_ratio > 3  # a quarter of the coordinates, 8 bits each (plus indices)
    assert all(c.codec == "ef | stridek:0.25 | q8" for r in s.records for c in r.clients if c.status == "accepted")
    # The engine ran the new rule: the aggregate is the mean of all rows but the largest.
    c = build_coordinator(load_config(path), store=False)
    c.run_round()
    x, w = c.last_updates.double(), c.last_weights.double()
    keep = torch.ones(len(x), dtype=torch.bool)
    keep[int(torch.linalg.vector_norm(x, dim=1).argmax())] = False
    torch.testing.assert_close(c.last_aggregate.double(), (w[keep, None] * x[keep]).sum(0) / w[keep].sum(), rtol=1e-5, atol=1e-7)


def test_the_new_codec_keeps_k_strided_coordinates_and_decodes_anywhere():
    v = torch.randn(1000)
    chain = parse_chain("stridek:0.1")
    payload, _ = chain.encode(v, None)
    out = decode_payload(payload, dim=1000)  # the generic decoder: no knowledge of "stridek"
    idx = torch.nonzero(out).flatten()
    assert len(idx) == 100 and bool((idx.diff() == 10).all())
    torch.testing.assert_close(out[idx], v[idx])


def test_names_are_checked_when_registering_and_in_configs():
    with pytest.raises(ValueError, match="is taken"):
        register_codec("q8", StrideK.from_args)
    class Bad:
        name = "median"

        def aggregate(self, updates, weights=None):
            return updates.mean(0)

    with pytest.raises(ValueError, match="is taken"):
        register_aggregator(Bad)
    with pytest.raises(ConfigError, match="server.aggregator = 'nope': unknown aggregator; allowed: .*drop_largest"):
        load_config({"server": {"aggregator": "nope"}})
