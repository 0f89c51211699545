"""New parts defined here, registered the documented way and run by name from a TOML config:
no other file is edited.  A robust aggregator and a codec stage (`register_aggregator`,
`register_codec`), and a selector, a weighting and a dataset with their own config keys
(`fleetlearn.parts.register_part`)."""

from __future__ import annotations

import re
import tomllib

import numpy as np
import pytest
import torch

import fleetlearn
from fleetlearn.aggregation import AGGREGATORS, register_aggregator
from fleetlearn.compression import CODECS, Sparsifier, decode_payload, parse_chain, register_codec
from fleetlearn.compression import wire
from fleetlearn.config import ConfigError, load_config
from fleetlearn.engine import build_coordinator
from fleetlearn.parts import PartConfig, find_part, names, register_part, unregister_part
from fleetlearn.selection import Selector


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


class BlockConfig(PartConfig):
    """The selector's own keys: `[server] selector = {name = "blocks", block = 3}`."""

    block: int = 2


class BlockSelector(Selector):
    """Round r takes the k clients from offset (r x block) on, cyclically: deterministic."""

    name = "blocks"

    def __init__(self, block: int = 2):
        self.block = block
        self.seen: list[list[int]] = []

    def select(self, available, k, round, rng):
        ids = sorted(available)
        start = (round * self.block) % len(ids)
        cohort = sorted((ids + ids)[start:start + k])
        self.seen.append(cohort)
        return cohort


class TopHalfConfig(PartConfig):
    share: float = 0.5


class TopHalfWeighting:
    """Weight 1 for the clients with the most examples (the top `share`), 0 for the others."""

    name = "top_half"

    def __init__(self, share: float = 0.5):
        self.share = share

    def __call__(self, info):
        n = np.asarray(info.num_examples, dtype=np.float64)
        cut = np.quantile(n, 1 - self.share)
        return (n >= cut).astype(np.float64)


class StripesConfig(PartConfig):
    features: int = 8
    examples: int = 400


def stripes(cfg, seed):
    """A 2-class dataset: class = whether the first feature is positive; 10 natural devices,
    devices 0-4 holding three times as many examples as 5-9.  `cfg` is the [data] section."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(400, 8)).astype(np.float32)
    client = np.concatenate([np.arange(200) % 10, np.arange(200) % 5])
    return {"x": x, "y": (x[:, 0] > 0).astype(np.int64), "client": client}


@pytest.fixture(autouse=True)
def registered():
    register_aggregator(DropLargest)
    register_codec("stridek", StrideK.from_args)
    register_part("selector", "blocks", BlockSelector, config=BlockConfig)
    register_part("weighting", "top_half", TopHalfWeighting, config=TopHalfConfig)
    register_part("dataset", "stripes", stripes, capabilities={"natural_devices"}, default_clients=10)
    yield
    AGGREGATORS.pop("drop_largest", None)
    CODECS.pop("stridek", None)
    for kind, name in (("selector", "blocks"), ("weighting", "top_half"), ("dataset", "stripes")):
        unregister_part(kind, name)


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


TOML_PARTS = """
seed = 0
[data]
dataset = "stripes"
partition = "natural"
[model]
hidden = [8]
[server]
rounds = 3
cohort = 4
weighting = { name = "top_half", share = 0.5 }
[server.selector]
name = "blocks"
block = 3
[client]
local_epochs = 1
"""


def test_a_registered_selector_weighting_and_dataset_run_by_name_from_toml(tmp_path):
    path = tmp_path / "parts.toml"
    path.write_text(TOML_PARTS)
    cfg = load_config(path)
    assert cfg.server.selector == "blocks" and cfg.server.options("selector").block == 3
    assert cfg.server.weighting == "top_half" and cfg.data.num_clients == 10  # the dataset's default population
    # written out and read back: the part tables survive
    assert load_config(tomllib.loads(cfg.to_toml())).to_dict() == cfg.to_dict()
    c = build_coordinator(cfg, store=False)
    for _ in range(3):
        c.run_round()
    assert c.selector.seen == [[3, 4, 5, 6], [6, 7, 8, 9], [0, 1, 2, 9]]  # offset round x 3, from round 1
    w = c.last_weights  # round 3: clients 0, 1, 2 (60 examples) and 9 (20): the weighting drops 9
    assert w.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0.0])


def test_registry_refusals_name_the_kind_the_name_and_the_allowed_names():
    with pytest.raises(ConfigError, match=r"server.selector = 'nope': unknown selector 'nope'; allowed: auto, random, poisson, oort, blocks"):
        load_config({"server": {"selector": "nope"}})
    with pytest.raises(ConfigError, match=re.escape("server.selector.blok: unknown key for selector 'blocks' (allowed: name, block)")):
        load_config({"server": {"selector": {"name": "blocks", "blok": 1}}})
    with pytest.raises(ConfigError, match=r"server.weighting = .*weighting 'uniform' takes no keys; got share"):
        load_config({"server": {"weighting": {"name": "uniform", "share": 1}}})
    with pytest.raises(ConfigError, match=r"engine.backend = 'grpc': unknown backend; allowed: simulation, ray"):
        load_config({"engine": {"backend": "grpc"}})
    with pytest.raises(ValueError, match="selector name 'oort' is taken"):
        register_part("selector", "oort", BlockSelector)
    assert "stripes" in names("dataset") and find_part("dataset", "stripes").capabilities == {"natural_devices"}


def test_a_dataset_without_natural_devices_is_refused_by_capability():
    register_part("dataset", "flat", stripes, default_clients=10)
    try:
        with pytest.raises(ConfigError, match=r"data.partition = 'natural' needs a dataset with its own devices.*capability 'natural_devices' missing"):
            load_config({"data": {"dataset": "flat", "partition": "natural"}, "server": {"cohort": 4}})
    finally:
        unregister_part("dataset", "flat")
