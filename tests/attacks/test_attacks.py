"""Attack simulation: each attack rewrites exactly the attackers' rows, with the
formula of its paper checked against an independent computation; the malicious set
is seeded and fixed; nothing happens before `start_round`; the transport trains the
label-flippers on flipped labels and reports who attacked; and a scaling attack
wrecks FedAvg but not the coordinate-wise median or trimmed mean."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from fleetlearn.attacks import (
    ATTACK_KINDS,
    UPDATE_ATTACKS,
    Attack,
    alie_z_max,
    build_attack,
    flip_labels,
    malicious_clients,
)
from fleetlearn.config import AttackConfig, ConfigError, load_config
from fleetlearn.learners.base import ClientData

MALICIOUS = [3, 7, 11, 12]
COHORT = np.array([0, 3, 5, 7, 9, 11, 14, 15, 20, 21])  # attackers 3, 7, 11 at rows 1, 3, 5
ROWS = np.isin(COHORT, MALICIOUS)
D = 50
MODEL_KINDS = [k for k in UPDATE_ATTACKS if k != "label_flip"]


@pytest.fixture
def deltas() -> torch.Tensor:
    return torch.randn(len(COHORT), D, generator=torch.Generator().manual_seed(1))


def attack(kind: str, **kw) -> Attack:
    return Attack(kind, MALICIOUS, num_classes=10, seed=5, **kw)


def mal(x: torch.Tensor) -> np.ndarray:
    return x[torch.from_numpy(ROWS)].double().numpy()


# -- every attack: attackers' rows only ------------------------------------------------
@pytest.mark.parametrize("collude", [True, False])
@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_attack_rewrites_exactly_the_malicious_rows(kind, collude, deltas):
    before = deltas.clone()
    out = attack(kind, collude=collude).apply(COHORT, deltas, round=1)
    assert torch.equal(deltas, before), "apply must not modify its input"
    assert out.shape == deltas.shape and out.dtype == deltas.dtype
    assert torch.equal(out[~torch.from_numpy(ROWS)], deltas[~torch.from_numpy(ROWS)])
    changed = (out != deltas).any(dim=1).numpy()
    assert np.array_equal(changed, ROWS)
    assert torch.isfinite(out).all()


def test_sign_flip_negates(deltas):
    out = attack("sign_flip", collude=False).apply(COHORT, deltas, 1)
    np.testing.assert_array_equal(mal(out), -mal(deltas))
    # Colluding: every attacker sends the negated mean of the attackers' honest updates.
    out = attack("sign_flip", collude=True).apply(COHORT, deltas, 1)
    expect = -mal(deltas).mean(0)
    np.testing.assert_allclose(mal(out), np.broadcast_to(expect, mal(out).shape), rtol=1e-6, atol=1e-6)


def test_scaling_multiplies(deltas):
    out = attack("scaling", scale=7.5, collude=False).apply(COHORT, deltas, 1)
    np.testing.assert_allclose(mal(out), 7.5 * mal(deltas), rtol=1e-6)
    out = attack("scaling", scale=7.5, collude=True).apply(COHORT, deltas, 1)
    np.testing.assert_allclose(mal(out), np.broadcast_to(7.5 * mal(deltas).mean(0), (3, D)), rtol=1e-5, atol=1e-6)


def test_alie_z_max_is_the_papers_formula():
    for n, f in [(20, 4), (10, 3), (50, 12), (50, 24), (100, 20), (7, 1)]:
        s = n // 2 + 1 - f  # workers the attackers must win over (Baruch et al., eq. 4)
        assert alie_z_max(n, f) == pytest.approx(norm.ppf((n - s) / n), abs=1e-9)
    assert alie_z_max(20, 4) == pytest.approx(0.38532, abs=1e-4)  # Phi^-1(13 / 20)
    assert math.isfinite(alie_z_max(10, 9)) and alie_z_max(10, 9) > 4  # corrupted majority: capped, not inf
    with pytest.raises(ValueError, match="n >= 1"):
        alie_z_max(0, 0)


def test_alie_colluding_sends_mean_minus_z_std_of_the_attackers_benign_updates(deltas):
    out = attack("alie", collude=True).apply(COHORT, deltas, 1)
    benign = mal(deltas)  # the attackers' honest updates, before the attack
    n, f = len(COHORT), int(ROWS.sum())
    z = norm.ppf((n - (n // 2 + 1 - f)) / n)
    expect = benign.mean(0) - z * benign.std(0, ddof=1)
    np.testing.assert_allclose(mal(out), np.broadcast_to(expect, (f, D)), rtol=1e-5, atol=1e-6)
    # A configured z overrides the paper's z_max.
    out = attack("alie", collude=True, alie_z=1.5).apply(COHORT, deltas, 1)
    np.testing.assert_allclose(mal(out)[0], benign.mean(0) - 1.5 * benign.std(0, ddof=1), rtol=1e-5, atol=1e-6)


def test_alie_independent_uses_its_own_magnitudes_as_std(deltas):
    out = attack("alie", collude=False, alie_z=1.0).apply(COHORT, deltas, 1)
    g = mal(deltas)
    np.testing.assert_allclose(mal(out), g - np.abs(g), rtol=1e-6, atol=1e-7)
    # A colluding cohort with one attacker has no sample std: the independent rule.
    one = np.array([0, 3, 5])
    x = deltas[:3]
    out = attack("alie", collude=True, alie_z=1.0).apply(one, x, 1)
    np.testing.assert_allclose(out[1].numpy(), (x[1] - x[1].abs()).numpy(), rtol=1e-6)


def test_same_value(deltas):
    out = attack("same_value", value=-3.25).apply(COHORT, deltas, 1)
    assert (mal(out) == -3.25).all()


def test_model_replacement_boosts_the_reverse_direction_by_the_cohort_size(deltas):
    n = len(COHORT)
    out = attack("model_replacement", collude=True).apply(COHORT, deltas, 1)
    np.testing.assert_allclose(mal(out), np.broadcast_to(-n * mal(deltas).mean(0), (3, D)), rtol=1e-5, atol=1e-5)
    out = attack("model_replacement", collude=False).apply(COHORT, deltas, 1)
    np.testing.assert_allclose(mal(out), -n * mal(deltas), rtol=1e-6)


def test_gaussian_replaces_with_seeded_noise(deltas):
    big = torch.zeros(len(COHORT), 20000)
    a = attack("gaussian", noise_std=3.0)
    out = a.apply(COHORT, big, 4)
    rows = mal(out)
    assert np.allclose(rows.std(1), 3.0, rtol=0.03) and np.allclose(rows.mean(1), 0.0, atol=0.1)
    assert not np.allclose(rows[0], rows[1]), "each attacker draws its own noise"
    assert torch.equal(out, a.apply(COHORT, big, 4)), "noise is a function of (seed, round, client)"
    assert not torch.equal(out, a.apply(COHORT, big, 5))
    # The noise does not depend on the honest update (it replaces it).
    np.testing.assert_array_equal(mal(a.apply(COHORT, big + 1.0, 4)), rows)


# -- label flip: data poisoning -------------------------------------------------------------
def _data(y) -> ClientData:
    y = torch.as_tensor(y)
    return ClientData(torch.zeros(len(y), 2), y, torch.zeros(2, 2), torch.tensor([0, 9]))


def test_label_flip_poisons_only_malicious_training_labels_from_start_round(deltas):
    a = attack("label_flip", start_round=3)
    y = [0, 1, 2, 9, 5]
    flipped = a.poison_data(7, _data(y), round=3)
    assert flipped.y.tolist() == [9, 8, 7, 0, 4]
    assert flipped.y_test.tolist() == [0, 9], "the local test split keeps its true labels"
    assert a.poison_data(5, _data(y), round=3).y.tolist() == y, "an honest client trains on its own labels"
    assert a.poison_data(7, _data(y), round=2).y.tolist() == y, "nothing before start_round"
    assert flip_labels(_data(y), 3).y.tolist() == [2, 1, 0, -7, -3]  # C - 1 - y, whatever C is
    assert torch.equal(a.apply(COHORT, deltas, 3), deltas), "label_flip leaves the updates alone"
    with pytest.raises(ValueError, match="number of classes"):
        Attack("label_flip", MALICIOUS)


# -- who is malicious, and when -----------------------------------------------------------
def test_malicious_set_is_seeded_and_has_the_configured_size():
    for pop, frac in [(100, 0.2), (30, 0.3), (7, 0.29), (10, 0.0), (10, 1.0), (1000, 0.123)]:
        ids = malicious_clients(pop, frac, seed=3)
        assert len(ids) == math.floor(frac * pop + 0.5) and len(set(ids.tolist())) == len(ids)
        assert ((ids >= 0) & (ids < pop)).all()
        np.testing.assert_array_equal(ids, malicious_clients(pop, frac, seed=3))
    assert not np.array_equal(malicious_clients(100, 0.2, 3), malicious_clients(100, 0.2, 4))
    a = build_attack({"kind": "sign_flip", "fraction": 0.2}, population=100, num_classes=10, seed=3)
    np.testing.assert_array_equal(a.malicious_ids, malicious_clients(100, 0.2, 3))
    np.testing.assert_array_equal(a.malicious(np.arange(100)), np.isin(np.arange(100), a.malicious_ids))
    assert build_attack({"kind": "none", "fraction": 0.5}, population=100, num_classes=10, seed=3) is None


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_nothing_changes_before_start_round(kind, deltas):
    a = attack(kind, start_round=4)
    for r in (1, 2, 3):
        assert torch.equal(a.apply(COHORT, deltas, r), deltas)
        assert not a.attackers(COHORT, r).any()
    assert not torch.equal(a.apply(COHORT, deltas, 4), deltas)
    np.testing.assert_array_equal(a.attackers(COHORT, 4), ROWS)
    np.testing.assert_array_equal(a.malicious(COHORT), ROWS)  # membership does not depend on the round


def test_attack_refuses_bad_settings():
    with pytest.raises(ValueError, match="unknown attack 'flip'"):
        Attack("flip", [])
    with pytest.raises(ValueError, match="start_round"):
        Attack("sign_flip", [], start_round=0)
    with pytest.raises(ValueError, match="scale"):
        Attack("scaling", [], scale=float("inf"))
    with pytest.raises(ValueError, match="deltas must be"):
        attack("sign_flip").apply(COHORT, torch.zeros(3, D), 1)


# -- configuration ------------------------------------------------------------------------
def test_attack_section_kinds_match_the_registry():
    assert set(AttackConfig.model_fields["kind"].annotation.__args__) == set(ATTACK_KINDS)


@pytest.mark.parametrize(
    "override, message",
    [
        ("attack.fraction=1.5", "attack.fraction = 1.5"),
        ("attack.start_round=0", "attack.start_round = 0"),
        ('attack.kind="flip"', "attack.kind = 'flip'"),
        ("attack.scale=0", "attack.scale = 0"),
        ("attack.alie_z=-1.0", "attack.alie_z = -1.0"),
        ("attack.value=inf", "attack.value = inf"),
        ("attack.boost=3", "attack.boost: unknown key"),
    ],
)
def test_attack_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config(None, [override])


# -- through the engine ---------------------------------------------------------------------
@pytest.fixture
def one_thread():
    # Tiny vmapped models are several times faster on one thread than on an oversubscribed two.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_transport_trains_label_flippers_on_flipped_labels_and_reports_attackers(one_thread, monkeypatch):
    from fleetlearn.engine import build_coordinator

    cfg = load_config(None, [
        "data.clients=20", "server.cohort=10", "server.rounds=2", "monitoring.debug=false",
        'attack.kind="label_flip"', "attack.fraction=0.3", "attack.start_round=2",
    ])
    coord = build_coordinator(cfg, store=False)
    transport = coord.transport
    order: list[int] = []
    trained: list[list[tuple[int, torch.Tensor]]] = []
    client_data, fit = transport.client_data, transport.learner.fit_cohort

    def spy_data(client):
        order.append(int(client))
        return client_data(client)

    def spy_fit(params, cohort, hp, seeds, corrections=None, step_limits=None):
        trained.append([(c, d.y.clone()) for c, d in zip(order, cohort)])
        order.clear()
        return fit(params, cohort, hp, seeds, corrections, step_limits)

    monkeypatch.setattr(transport, "client_data", spy_data)
    monkeypatch.setattr(transport.learner, "fit_cohort", spy_fit)
    bad = set(malicious_clients(20, 0.3, cfg.seed).tolist())
    for r in (1, 2):
        coord.run_round()
        assert len(trained[-1]) == 10
        for client, y in trained[-1]:
            own = transport.data.y[torch.from_numpy(transport.data.train_indices(client))]
            expect = 9 - own if (r >= 2 and client in bad) else own
            assert torch.equal(y, expect), (r, client)
        attackers = sorted(c for c, _ in trained[-1] if c in bad) if r >= 2 else []
        assert sorted(transport.last_malicious) == attackers
    assert transport.last_malicious, "with 30% attackers some were in the cohort (seed 0)"


def _final(aggregator: str, extra: list[str] = ()) -> float:
    import fleetlearn

    s = fleetlearn.run(None, store=False, overrides=[
        "seed=0", "data.clients=30", "server.cohort=10", "server.rounds=10", "monitoring.debug=false",
        'attack.kind="scaling"', "attack.fraction=0.3", "attack.scale=50", f'server.aggregator="{aggregator}"', *extra,
    ])
    return float(np.mean([r.accuracy for r in s.records[-3:]]))


def test_scaling_attack_wrecks_the_mean_but_not_the_median_or_trimmed_mean(one_thread):
    mean_acc = _final("mean")
    median_acc = _final("median")
    trimmed_acc = _final("trimmed_mean", ["server.trim_beta=0.3"])  # 30% attackers: trim 3 of 10 per side
    assert mean_acc < 0.3, f"FedAvg under a x50 scaling attack should collapse, got {mean_acc:.3f}"
    assert median_acc > 0.8 and median_acc > mean_acc + 0.4, (mean_acc, median_acc)
    assert trimmed_acc > 0.8 and trimmed_acc > mean_acc + 0.4, (mean_acc, trimmed_acc)
