"""Divide-and-Conquer (DnC) and the client reputation it can keep."""

import re

import numpy as np
import pytest
import torch

from fleetlearn.aggregation import (
    AGGREGATORS,
    ClientReputation,
    DnCAggregator,
    default_f,
    dnc,
    dnc_scores,
    norm_bounded_mean,
)
from fleetlearn.config import ConfigError, load_config
from fleetlearn.engine.factory import build_aggregator

RNG = np.random.default_rng(2021)


def colluding_sign_flip(n=20, f=4, d=200, seed=0):
    """Label-skew-like honest rows (a shared mean plus large client-specific parts) and
    f colluders that all send minus the mean of their own honest rows."""
    rng = np.random.default_rng(seed)
    honest = 0.5 + rng.normal(scale=1.0, size=(n, d))
    attacked = honest.copy()
    attacked[:f] = -honest[:f].mean(0)
    return honest, attacked


def test_scores_are_squared_projections_on_the_top_singular_vector():
    x = RNG.normal(size=(15, 40))
    y = x - x.mean(0)
    v = np.linalg.svd(y, full_matrices=False)[2][0]
    np.testing.assert_allclose(dnc_scores(x).numpy(), (y @ v) ** 2, rtol=1e-9, atol=1e-12)


def test_identical_colluders_are_removed_and_the_rest_averaged():
    honest, attacked = colluding_sign_flip()
    np.testing.assert_allclose(dnc(attacked, 4), honest[4:].mean(0), rtol=1e-12, atol=1e-12)
    # a plain mean is pulled towards them
    assert np.linalg.norm(attacked.mean(0) - honest[4:].mean(0)) > 0.1


def test_clipping_bounds_a_boosted_row_that_is_kept():
    # f = 0 removes nothing, so clipped DnC is the mean with every row clipped to the
    # median norm: norm_bounded_mean with its median bound.
    x = RNG.normal(size=(11, 30))
    x[0] *= 1e4
    np.testing.assert_allclose(dnc(x, 0, clip=True), norm_bounded_mean(x, None), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dnc(x, 0, clip=True, max_norm=0.5), norm_bounded_mean(x, 0.5), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dnc(x, 0), x.mean(0), rtol=1e-12, atol=1e-9)


def test_c_scales_how_many_rows_are_removed():
    honest, attacked = colluding_sign_flip(f=6)
    # f = 4 told, 6 colluders present: c = 1.5 removes floor(1.5 * 4) = 6 rows
    np.testing.assert_allclose(dnc(attacked, 4, c=1.5), honest[6:].mean(0), rtol=1e-12, atol=1e-12)
    assert np.linalg.norm(dnc(attacked, 4) - honest[6:].mean(0)) > 0.1


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: dnc(np.zeros((8, 3)), 4), "dnc needs n > 2f (an honest majority): n = 8, f = 4"),
        (lambda: dnc(np.zeros((3, 3)), 1, c=3.0), "dnc needs n > floor(c * f) (at least one row kept): n = 3, f = 1, c = 3.0"),
        (lambda: dnc(np.zeros((5, 3)), 1, c=0.0), "dnc: c (the filtering fraction) must be a finite number > 0, got 0.0"),
        (lambda: dnc(np.zeros((5, 3)), -1), "dnc: f (the number of Byzantine clients) must be an integer >= 0, got -1"),
        (lambda: dnc(np.zeros((5, 3)), 1, max_norm=-1.0), "dnc: max_norm must be a finite number > 0, got -1.0"),
        (lambda: dnc(np.full((5, 3), np.nan), 1), "dnc: updates contain NaN or inf in 5 row(s)"),
    ],
)
def test_errors_name_the_problem(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_default_f_keeps_an_honest_majority():
    for n in range(1, 40):
        f = default_f(n, "dnc")
        assert f == min(n // 5, (n - 1) // 2) and n > 2 * f
    assert AGGREGATORS["dnc"]().aggregate(torch.ones(1, 3)).tolist() == [1.0, 1.0, 1.0]


def test_the_part_clips_by_default_and_records_what_it_removed():
    honest, attacked = colluding_sign_flip()
    x = torch.from_numpy(attacked)
    part = AGGREGATORS["dnc"](f=4)
    torch.testing.assert_close(part.aggregate(x), dnc(x, 4, clip=True))
    assert sorted(part.last_removed) == [0, 1, 2, 3] and part.last_distrusted == []
    torch.testing.assert_close(AGGREGATORS["dnc"](f=4, clip=False).aggregate(x), dnc(x, 4))


# -- reputation --------------------------------------------------------------------------


def test_reputation_distrusts_after_min_rounds_when_flagged_more_than_threshold():
    rep = ClientReputation(min_rounds=2, threshold=0.5)
    rep.record([1, 2, 3], [True, True, False])
    assert rep.distrusted([1, 2, 3]).tolist() == [False, False, False]  # one appearance is not enough
    rep.record([1, 2, 3], [True, False, False])
    assert rep.distrusted([1, 2, 3, 99]).tolist() == [True, False, False, False]  # 2/2 > 0.5; 1/2 is not
    rep.record([1], [False])
    rep.record([1], [False])
    assert rep.counts(1) == (4, 2) and rep.distrusted([1]).tolist() == [False]  # trust earned back at 2/4


def test_reputation_state_round_trips_and_bad_state_is_refused():
    rep = ClientReputation()
    rep.record([5, 7, 9], [True, False, True])
    rep.record([5, 9], [True, False])
    other = ClientReputation()
    other.load_state_dict(rep.state_dict())
    assert [other.counts(i) for i in (5, 7, 9, 11)] == [(2, 2), (1, 0), (2, 1), (0, 0)]
    assert other.distrusted([5, 7, 9]).tolist() == rep.distrusted([5, 7, 9]).tolist() == [True, False, False]
    bad = rep.state_dict()
    bad["flagged"] = bad["seen"] + 1
    with pytest.raises(ValueError, match="0 <= flagged <= seen"):
        other.load_state_dict(bad)
    with pytest.raises(ValueError, match="state lacks"):
        other.load_state_dict({"ids": torch.zeros(0)})


@pytest.mark.parametrize(
    "kwargs, message",
    [({"min_rounds": 0}, "min_rounds must be an integer >= 1"), ({"threshold": 1.0}, "0 <= threshold < 1")],
)
def test_reputation_parameters_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ClientReputation(**kwargs)


def test_reputation_drops_a_known_attacker_that_blends_in():
    honest, attacked = colluding_sign_flip(n=10, f=2, d=100)
    part = DnCAggregator(f=2, clip=False, reputation=True)
    ids = list(range(100, 110))
    for _ in range(2):  # clients 100 and 101 collude twice and are flagged twice
        part.aggregate_round(ids, torch.from_numpy(attacked))
        assert sorted(part.last_removed) == [0, 1]
    # Now both send ordinary updates and an honest client (row 5) is the outlier: the
    # history drops 100 and 101, which spends the round's budget of floor(c * f) = 2
    # removals, so row 5 is kept.
    third = honest.copy()
    third[5] += 40.0
    out = part.aggregate_round(ids, torch.from_numpy(third))
    assert part.last_distrusted == [0, 1] and sorted(part.last_removed) == [0, 1]
    np.testing.assert_allclose(out.numpy(), third[2:].mean(0), rtol=1e-12)
    assert part.reputation.counts(105) == (3, 1)
    with pytest.raises(ValueError, match="needs the client ids"):
        part.aggregate(torch.from_numpy(third))
    with pytest.raises(ValueError, match="3 client ids for 10 updates"):
        part.aggregate_round([1, 2, 3], torch.from_numpy(third))


def test_reputation_never_drops_every_row():
    part = DnCAggregator(f=0, reputation=True, reputation_min_rounds=1, reputation_threshold=0.0)
    part.reputation.record([1, 2], [True, True])
    out = part.aggregate_round([1, 2], torch.tensor([[1.0, 0.0], [3.0, 0.0]], dtype=torch.float64))
    # both distrusted: the round falls back to its own evidence (f = 0: nothing removed);
    # rows clipped to the median norm (torch's lower middle, 1): (1 + 1) / 2
    assert out.tolist() == [1.0, 0.0] and part.last_removed == [] and part.last_distrusted == []


def test_config_builds_the_part_and_refuses_reputation_without_dnc():
    base = {"data": {"clients": 50}}
    part = build_aggregator(load_config({**base, "server": {"aggregator": "dnc", "byzantine_f": 3, "dnc_c": 1.5, "reputation": True, "reputation_min_rounds": 3}}))
    assert isinstance(part, DnCAggregator) and part.f == 3 and part.c == 1.5 and part.clip
    assert part.needs_client_ids and part.reputation.min_rounds == 3 and part.reputation.threshold == 0.5
    assert not build_aggregator(load_config({**base, "server": {"aggregator": "dnc"}})).needs_client_ids
    with pytest.raises(ConfigError, match=re.escape("server.reputation = true needs the flags of server.aggregator = 'dnc'; got server.aggregator = 'median'")):
        load_config({**base, "server": {"aggregator": "median", "reputation": True}})
