"""Privacy wired into the engine: DP-FedAvg, local DP, accounting, budget, SecAgg."""

import dp_accounting
import pytest
import torch

import fleetlearn
from fleetlearn.config import ConfigError, load_config
from fleetlearn.engine import build_coordinator

BASE = {"data": {"clients": 50}, "server": {"rounds": 4, "cohort": 10}, "client": {"local_epochs": 2}}


def with_privacy(**p):
    return {**BASE, "privacy": {"delta": 1e-3, **p}}


def independent_epsilon(q, z, rounds, delta):
    acc = dp_accounting.pld.PLDAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    return acc.get_epsilon(delta)


def test_central_dp_reports_the_epsilon_dp_accounting_computes():
    s = fleetlearn.run(with_privacy(mode="central", noise_multiplier=1.0, clip_norm=1.0), store=False)
    eps = [r.extra["dp_epsilon"] for r in s.records]
    assert eps == sorted(eps) and eps[0] > 0
    for k, e in enumerate(eps, start=1):
        assert e == pytest.approx(independent_epsilon(10 / 50, 1.0, k, 1e-3), rel=1e-9)
    assert all(r.extra["dp_clip_norm"] == 1.0 for r in s.records)


def test_budget_stops_the_run_cleanly_before_it_is_exceeded():
    budget = independent_epsilon(0.2, 1.0, 2, 1e-3) * 1.0001  # room for exactly two rounds
    s = fleetlearn.run(with_privacy(mode="central", noise_multiplier=1.0, budget_epsilon=budget), store=False)
    assert s.rounds == 2 and "privacy budget" in s.stopped_reason
    assert s.records[-1].extra["dp_epsilon"] <= budget


def test_local_dp_noises_each_update_on_the_client():
    c = build_coordinator(load_config(with_privacy(mode="local", noise_multiplier=0.5, clip_norm=0.1)), store=False)
    rec = c.run_round()
    d = c.learner.spec.dim
    # Clipped to 0.1 then noise of std 0.05 per coordinate: the norm is about 0.05 sqrt(d).
    norms = torch.tensor([cr.update_norm for cr in rec.clients])
    expected = 0.05 * d ** 0.5
    assert ((norms > 0.8 * expected) & (norms < 1.2 * expected)).all()
    assert rec.extra["dp_epsilon"] > 0


def test_secure_aggregation_matches_the_plain_mean_up_to_quantization():
    plain = build_coordinator(load_config(BASE), store=False)
    secure = build_coordinator(load_config({**BASE, "privacy": {"secure_aggregation": True, "secagg_clip_range": 1.0, "secagg_rounding": "deterministic"}}), store=False)
    plain.run_round()
    secure.run_round()
    diff = (plain.params - secure.params).abs().max().item()
    assert diff < 1e-3 and not torch.equal(plain.params, secure.params)


def test_impossible_combinations_are_refused_with_the_reason():
    with pytest.raises(ConfigError, match="async"):
        build_coordinator(load_config({**with_privacy(mode="central"), "server": {"rounds": 2, "cohort": 10, "mode": "async"}}), store=False)
    with pytest.raises(ConfigError, match="delta"):
        build_coordinator(load_config({**BASE, "privacy": {"mode": "central", "delta": 0.1}}), store=False)
