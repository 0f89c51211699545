"""Count-sketch uplinks aggregate in sketch space (`SketchSpaceStage`): the run's linear
stage -- the weighted mean, secure aggregation's sum, central DP's clip/sum/noise,
regional pre-aggregation -- runs on the clients' sketch tables and the result is
unsketched once.  Before this stage existed, central DP with a sketch uplink silently
aggregated zero rows (the model never moved) and secure aggregation was refused."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fleetlearn.aggregation import MeanAggregator
from fleetlearn.aggregation.pipeline import Batch, SketchSpaceStage, build_pipeline
from fleetlearn.compression import decode_payload, parse_chain, read_sketch, sum_sketches
from fleetlearn.config import load_config
from fleetlearn.engine import build_coordinator
from fleetlearn.params import PayloadError
from fleetlearn.privacy.dp import CentralDP
from fleetlearn.privacy.secagg import SecureAggregation

D = 1000
CHAIN = "sketch:20,cols=300,rows=5,seed=4"


def updates(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g) * 0.01
    x[:, :20] += torch.linspace(0.5, 2.0, 20)  # shared heavy hitters
    return x


def batch_of(x, w):
    chain = parse_chain(CHAIN)
    payloads = [chain.encode(row, None)[0] for row in x]
    return chain, Batch(torch.zeros(len(x), D), np.asarray(w, dtype=np.float64), list(range(len(x))), payloads, round=1)


def test_the_mean_in_sketch_space_is_the_unsketched_weighted_sum_of_sketches():
    x = updates()
    w = np.arange(1.0, 7.0)
    chain, batch = batch_of(x, w)
    stage = build_pipeline(MeanAggregator(), sketch=chain, dim=D)
    assert isinstance(stage, SketchSpaceStage) and stage.name == "sketch_space(mean)" and stage.width == 5 * 300
    got = stage.next(batch).aggregate
    want = decode_payload(sum_sketches(batch.payloads, w / w.sum()), dim=D)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert int((got != 0).sum()) == 20  # k heavy hitters, unsketched once
    assert len(set(torch.nonzero(got).flatten().tolist()) & set(range(20))) >= 16  # most heavy hitters recovered


def test_secure_aggregation_sums_the_sketch_tables():
    x = updates(seed=1)
    w = np.ones(6)
    chain, batch = batch_of(x, w)
    secure = SecureAggregation(clip_range=8.0, max_clients=10, seed=0)
    stage = build_pipeline(MeanAggregator(), privacy=SimpleNamespace(central=None, secure=secure), sketch=chain, dim=D)
    assert stage.name == "sketch_space(secure_sum)" and stage.capacity == 10
    got = stage.next(batch).aggregate
    # The secure sum ran over one row per client of rows x cols entries: the tables, not the d-vectors.
    assert secure.last.sum.shape == (5 * 300,) and len(secure.last.survivors) == 6
    plain = decode_payload(sum_sketches(batch.payloads, w / w.sum()), dim=D)
    assert set(torch.nonzero(got).flatten().tolist()) == set(torch.nonzero(plain).flatten().tolist())
    # 32-bit fixed point over [-8, 8]: each table entry within 6 quantization steps of the plain mean.
    torch.testing.assert_close(got, plain, rtol=0, atol=6 * 16 / 2**32 * 10 * 6)


def test_central_dp_clips_each_clients_table_and_noises_in_sketch_space():
    x = updates(seed=2) * 5
    chain, batch = batch_of(x, np.ones(6))
    tables = torch.stack([read_sketch(p).table.reshape(-1) for p in batch.payloads]).double()
    c = 1.0
    assert bool((torch.linalg.vector_norm(tables, dim=1) > c).all())  # every table gets clipped
    stage = build_pipeline(MeanAggregator(), privacy=SimpleNamespace(central=CentralDP(0.0, c, 6.0, seed=0), secure=None),
                           sketch=chain, dim=D)
    res = stage.next(batch)
    clipped = tables * torch.clamp(c / torch.linalg.vector_norm(tables, dim=1), max=1.0)[:, None]
    want = chain.from_sum(clipped.sum(0).float() / 6.0, D)
    torch.testing.assert_close(res.aggregate, want, rtol=1e-5, atol=1e-7)
    assert res.measurements["dp_clip_norm"] == c and res.measurements["dp_noise_std"] == 0.0


def test_a_sketch_of_another_shape_is_refused_by_name():
    chain = parse_chain(CHAIN)
    other = parse_chain("sketch:20,cols=301,rows=5,seed=4").encode(updates()[0], None)[0]
    with pytest.raises(PayloadError, match=r"sketch is 5 x 301 .* this run's .* is 5 x 300"):
        chain.summand(other, D)
    reseeded = parse_chain("sketch:20,cols=300,rows=5,seed=5").encode(updates()[0], None)[0]
    with pytest.raises(PayloadError, match="seed 5"):
        chain.summand(reseeded, D)


BASE = {"seed": 2, "data": {"clients": 30}, "model": {"hidden": [32]}, "server": {"rounds": 3, "cohort": 8},
        "client": {"local_epochs": 2}, "compression": {"uplink": "sketch:0.1,cols=0.1,rows=3"}}


def test_secure_aggregation_with_a_sketch_uplink_runs_and_matches_the_plain_sketch_mean():
    plain = build_coordinator(load_config(BASE), store=False)
    secure = build_coordinator(load_config({**BASE, "privacy": {"secure_aggregation": True, "secagg_clip_range": 4.0}}), store=False)
    assert secure.pipeline.name == "sketch_space(secure_sum)"
    a, b = plain.run_round(), secure.run_round()
    assert a.status == b.status == "ok" and a.accepted == b.accepted == 8
    assert float(plain.last_aggregate.norm()) > 0
    torch.testing.assert_close(secure.last_aggregate, plain.last_aggregate, rtol=0, atol=1e-5)


def test_central_dp_with_a_sketch_uplink_moves_the_model():
    """The bug this stage fixed: the DP stage summed the sketch decoder's zero rows."""
    cfg = {**BASE, "privacy": {"mode": "central", "noise_multiplier": 0.0, "clip_norm": 1.0, "delta": 1e-3}}
    c = build_coordinator(load_config(cfg), store=False)
    assert c.pipeline.name == "sketch_space(central_dp)"
    p0 = c.params.clone()
    rec = c.run_round()
    assert rec.status == "ok" and rec.accepted > 0
    step = c.params - p0
    assert float(step.norm()) > 0 and int((step != 0).sum()) <= int(0.1 * c.dim) + 1  # the k heavy hitters only


def test_regions_pre_aggregate_sketch_tables():
    c = build_coordinator(load_config({**BASE, "engine": {"regions": 2}}), store=False)
    assert c.pipeline.name == "sketch_space(hierarchy)"
    rec = c.run_round()
    assert rec.status == "ok" and float(c.last_aggregate.norm()) > 0
