"""The accountant against dp-accounting's own computation, budget stopping, state."""

import json
import math

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from fleetlearn.privacy import PrivacyAccountant


def _independent(method, q, z, rounds, delta):
    """dp-accounting used directly, the way its docs show, without our code."""
    acc = RdpAccountant() if method == "rdp" else PLDAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    acc.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("method", ["rdp", "pld"])
@pytest.mark.parametrize("q,z,rounds,delta", [(0.1, 1.0, 40, 1e-5), (0.02, 0.8, 75, 1e-6)])
def test_reported_epsilon_equals_dp_accounting(method, q, z, rounds, delta):
    acc = PrivacyAccountant(delta=delta, accounting=method)
    for _ in range(rounds):  # the engine records round by round
        acc.record_round(q, z)
    spent = acc.spent()
    want = _independent(method, q, z, rounds, delta)
    assert spent.epsilon == want  # same library, same computation: exactly equal
    assert (spent.delta, spent.rounds) == (delta, rounds)
    assert 0 < spent.epsilon < math.inf


@pytest.mark.parametrize("method", ["rdp", "pld"])
def test_varying_sampling_rate_composes_like_dp_accounting(method):
    acc = PrivacyAccountant(delta=1e-5, accounting=method)
    for q in [0.1] * 5 + [0.2] * 3 + [0.1] * 2:
        acc.record_round(q, 1.5)
    assert [r[2] for r in acc.runs] == [5, 3, 2]
    ref = RdpAccountant() if method == "rdp" else PLDAccountant()
    for q, count in [(0.1, 5), (0.2, 3), (0.1, 2)]:
        ref.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.5)), count)
    assert acc.epsilon() == ref.get_epsilon(1e-5)


def test_full_participation_is_plain_gaussian_and_local_mode_halves_z():
    central = PrivacyAccountant(1e-5, "rdp")
    central.record_round(1.0, 2.0, rounds=10)
    assert central.epsilon() == RdpAccountant().compose(dp_accounting.GaussianDpEvent(2.0), 10).get_epsilon(1e-5)
    local = PrivacyAccountant(1e-5, "rdp", mode="local")
    local.record_round(0.1, 2.0, rounds=10)  # local: sensitivity 2C, no sampling amplification
    assert local.epsilon() == RdpAccountant().compose(dp_accounting.GaussianDpEvent(1.0), 10).get_epsilon(1e-5)


def test_planning_and_monotonicity():
    acc = PrivacyAccountant(1e-5, "rdp")
    assert acc.epsilon() == 0.0 and acc.spent().rounds == 0
    e50 = acc.epsilon_after(50, 0.1, 1.0)
    assert e50 == _independent("rdp", 0.1, 1.0, 50, 1e-5)
    assert acc.epsilon_after(25, 0.1, 1.0) < e50 < acc.epsilon_after(100, 0.1, 1.0)
    assert acc.epsilon_after(50, 0.1, 2.0) < e50 < acc.epsilon_after(50, 0.2, 1.0)
    acc.record_round(0.1, 1.0, rounds=20)
    # more rounds on top of the ledger, with the last (q, z) by default
    assert acc.epsilon_after(30) == e50
    assert acc.rounds == 20  # planning does not spend


@pytest.mark.parametrize("method", ["rdp", "pld"])
def test_budget_stops_before_exceeding(method):
    q, z = 0.1, 2.0
    budget = _independent(method, q, z, 20, 1e-5) * (1 + 1e-9)  # exactly 20 rounds fit
    acc = PrivacyAccountant(1e-5, method)
    assert PrivacyAccountant(1e-5, method).max_rounds(budget, q, z) == 20
    ran = 0
    while not acc.would_exceed(budget, q, z):  # the engine's check before each round
        acc.record_round(q, z)
        ran += 1
        assert ran <= 25
    assert ran == 20
    assert acc.epsilon() <= budget < acc.epsilon_after(1)


@pytest.mark.parametrize("method", ["rdp", "pld"])
def test_zero_noise_is_infinite_epsilon(method):
    acc = PrivacyAccountant(1e-5, method)
    acc.record_round(0.1, 1.0)
    acc.record_round(0.1, 0.0)
    assert acc.epsilon() == math.inf
    assert acc.would_exceed(1e6)


def test_local_mode_pld_matches_library():
    acc = PrivacyAccountant(1e-5, "pld", mode="local")
    acc.record_round(0.3, 4.0, rounds=12)
    assert acc.epsilon() == PLDAccountant().compose(dp_accounting.GaussianDpEvent(2.0), 12).get_epsilon(1e-5)


@pytest.mark.parametrize("method", ["rdp", "pld"])
def test_state_roundtrip_through_json(method):
    acc = PrivacyAccountant(1e-5, method)
    acc.record_round(0.1, 2.0, rounds=7)
    acc.record_round(0.05, 2.0, rounds=3)
    state = json.loads(json.dumps(acc.state_dict()))
    restored = PrivacyAccountant.from_state_dict(state)
    assert restored.runs == acc.runs and restored.rounds == 10
    assert restored.epsilon() == acc.epsilon()
    restored.record_round(0.05, 2.0)
    acc.record_round(0.05, 2.0)
    assert restored.epsilon() == acc.epsilon()
    with pytest.raises(ValueError, match="mode"):
        PrivacyAccountant(1e-5, method, mode="local").load_state_dict(state)


def test_errors_are_clear():
    acc = PrivacyAccountant(1e-5, "rdp")
    with pytest.raises(ValueError, match="no round recorded"):
        acc.epsilon_after(1)
    with pytest.raises(ValueError, match="sampling_rate"):
        acc.record_round(0.0, 1.0)
    with pytest.raises(ValueError, match="sampling_rate"):
        acc.record_round(1.5, 1.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        acc.record_round(0.1, -1.0)
    with pytest.raises(ValueError, match="delta"):
        PrivacyAccountant(0.0)
    with pytest.raises(ValueError, match="accounting"):
        PrivacyAccountant(1e-5, "moments")
    with pytest.raises(ValueError, match="budget_epsilon"):
        acc.would_exceed(0, 0.1, 1.0)
