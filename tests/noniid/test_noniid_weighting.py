"""Aggregation weights: each against an independent computation, and the input errors."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fleetlearn.config import load_config
from fleetlearn.engine import build_coordinator

from fleetlearn.aggregation.weighting import (
    WEIGHTINGS,
    CohortInfo,
    claim_ratio,
    distance,
    examples,
    label_importance,
    loss_improvement,
    make_weighting,
    uniform,
    weighting_from_config,
)
from fleetlearn.engine.coordinator import Coordinator


# -- examples ------------------------------------------------------------------------------


@pytest.mark.parametrize("max_examples,ratio", [(None, 10.0), (50, 10.0), (None, 2.0), (7, 1.5)])
def test_examples_mirrors_coordinator(max_examples, ratio):
    claims = [3, 10, 12, 40, 1000, 0, 25]
    fake = SimpleNamespace(config=SimpleNamespace(server=SimpleNamespace(max_examples=max_examples, max_examples_ratio=ratio)))
    want = Coordinator.example_weights(fake, claims)
    np.testing.assert_array_equal(examples(claims, max_examples, ratio), want)


def test_examples_by_hand():
    # median 12 -> cap 24 at ratio 2; also capped at 20
    np.testing.assert_array_equal(examples([3, 12, 100], max_examples_ratio=2.0), [3, 12, 24])
    np.testing.assert_array_equal(examples([3, 12, 100], max_examples=20, max_examples_ratio=2.0), [3, 12, 20])


def test_uniform():
    np.testing.assert_array_equal(uniform(4), np.ones(4))
    with pytest.raises(ValueError, match="number of clients"):
        uniform(0)


# -- loss improvement ------------------------------------------------------------------------


def test_loss_improvement_by_hand():
    before = [2.0, 2.0, 1.0, 3.0]
    after = [1.0, 2.5, 0.9, 3.0]  # gains 1.0, -0.5 (-> 0), 0.1, 0.0
    np.testing.assert_allclose(loss_improvement(before, after, floor=0.2), [1.0, 0.2, 0.2, 0.2])
    np.testing.assert_allclose(loss_improvement(before, after, floor=0.05), [1.0, 0.05, 0.1, 0.05])
    np.testing.assert_allclose(loss_improvement(before, after, floor=0.0), [1.0, 0.0, 0.1, 0.0])


def test_loss_improvement_nobody_improved_is_uniform():
    np.testing.assert_array_equal(loss_improvement([1.0, 2.0], [1.5, 2.0]), [1.0, 1.0])


def test_loss_improvement_never_zero_when_someone_improved():
    rng = np.random.default_rng(0)
    for _ in range(20):
        b, a = rng.random(30), rng.random(30)
        w = loss_improvement(b, a, floor=0.01)
        assert (w > 0).all() and (w >= 0).all()


# -- distance ---------------------------------------------------------------------------------


def test_distance_exp_independent_computation():
    rng = np.random.default_rng(1)
    u = rng.normal(size=(7, 20))
    g = rng.normal(size=20)
    d = np.array([math.sqrt(sum((u[i, j] - g[j]) ** 2 for j in range(20))) for i in range(7)])
    med = sorted(d)[3]
    want = np.exp(-d / (2.0 * med))
    np.testing.assert_allclose(distance(u, g, mode="exp", temperature=2.0), want, rtol=1e-12)
    # torch input gives the same numbers
    np.testing.assert_allclose(distance(torch.from_numpy(u), torch.from_numpy(g), temperature=2.0), want, rtol=1e-6)


def test_distance_cosine_independent_computation():
    g = np.array([1.0, 0.0])
    u = np.array([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    np.testing.assert_allclose(distance(u, g, mode="cosine"), [1.0, 0.5, 0.0, (1 + 1 / math.sqrt(2)) / 2, 0.5], rtol=1e-12)
    np.testing.assert_allclose(distance(u, g, mode="cosine", temperature=0.5), np.array([1.0, 0.5, 0.0, (1 + 1 / math.sqrt(2)) / 2, 0.5]) ** 2)


def test_distance_first_round_and_degenerate():
    np.testing.assert_array_equal(distance(np.ones((3, 4)), None), np.ones(3))
    np.testing.assert_array_equal(distance(np.ones((3, 4)), np.ones(4)), np.ones(3))  # all distances 0
    # median 0 but one outlier: the mean distance is the unit, the outlier is down-weighted
    w = distance(np.array([[0.0], [0.0], [3.0]]), np.array([0.0]))
    np.testing.assert_allclose(w, [1.0, 1.0, math.exp(-3.0)])


# -- label importance --------------------------------------------------------------------------


def test_label_importance_recovers_a_known_mixture():
    rng = np.random.default_rng(2)
    counts = rng.integers(0, 50, size=(6, 10)).astype(float)  # 6 clients, 10 classes: full row rank
    p = counts / counts.sum(1, keepdims=True)
    true_w = np.array([0.3, 0.05, 0.2, 0.15, 0.1, 0.2])
    target = p.T @ true_w
    np.testing.assert_allclose(label_importance(counts, target, method="nnls"), true_w, atol=1e-10)
    np.testing.assert_allclose(label_importance(counts, target, method="multiplicative", iterations=20000), true_w, atol=1e-4)


def test_label_importance_uniform_target_balances_two_skewed_clients():
    # client 0: 3:1 of classes 0/1; client 1: 1:3.  Equal weights give 50/50.
    w = label_importance([[30, 10], [5, 15]], "uniform")
    np.testing.assert_allclose(w, [0.5, 0.5], atol=1e-12)
    # the global target (35:25) is matched by example-count-proportional weights 40:20
    g = label_importance([[30, 10], [5, 15]], "global")
    np.testing.assert_allclose(g, [40 / 60, 20 / 60], atol=1e-12)


def test_label_importance_mixture_matches_target_and_zero_rows():
    rng = np.random.default_rng(3)
    counts = rng.dirichlet(np.full(5, 0.3), size=12) * 100  # more clients than classes
    counts[4] = 0  # a client with no labels
    for method in ("nnls", "multiplicative"):
        w = label_importance(counts, "uniform", method=method, iterations=3000)
        assert w.shape == (12,) and (w >= 0).all() and w[4] == 0
        p = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        mix = p.T @ w
        assert np.abs(mix / mix.sum() - 0.2).max() < 0.02, method
    assert (label_importance(counts, "uniform", method="multiplicative", iterations=50)[np.arange(12) != 4] > 0).all()


# -- errors ------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="NaN"):
        examples([1.0, float("nan")])
    with pytest.raises(ValueError, match=">= 0"):
        examples([1, -2])
    with pytest.raises(ValueError, match="1-D"):
        examples([[1, 2]])
    with pytest.raises(ValueError, match="shape"):
        loss_improvement([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        loss_improvement([1.0, float("inf")], [1.0, 1.0])
    with pytest.raises(ValueError, match="columns"):
        distance(np.ones((2, 3)), np.ones(4))
    with pytest.raises(ValueError, match="mode"):
        distance(np.ones((2, 3)), np.ones(3), mode="l1")
    with pytest.raises(ValueError, match=">= 0"):
        label_importance([[1, -1], [2, 2]])
    with pytest.raises(ValueError, match="classes"):
        label_importance([[1, 1], [2, 2]], target=[0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match="empty"):
        label_importance([[0, 0], [0, 0]])
    with pytest.raises(ValueError, match="2-D"):
        label_importance([1, 2, 3])


# -- parts -------------------------------------------------------------------------------------


def test_parts_read_cohort_info_and_config():
    info = CohortInfo(
        num_examples=[10, 20, 30],
        loss_before=[1.0, 1.0, 1.0],
        loss_after=[0.5, 0.9, 1.2],
        updates=np.eye(3),
        previous_aggregate=np.array([1.0, 0.0, 0.0]),
        label_counts=[[10, 0], [0, 10], [5, 5]],
    )
    assert set(WEIGHTINGS) == {"examples", "uniform", "loss_improvement", "distance", "label_importance"}
    for name, cls in WEIGHTINGS.items():
        w = cls()(info)
        assert w.shape == (3,) and (w >= 0).all() and w.sum() > 0, name
    # A cohort of 3: the default cap is 2x the lower median (claim_ratio(3) = 2).
    np.testing.assert_array_equal(make_weighting("examples")(info), [10, 20, 30])
    np.testing.assert_array_equal(make_weighting("examples", max_examples_ratio=1)(info), [10, 20, 20])
    np.testing.assert_array_equal(make_weighting("examples", max_examples_ratio=10)(info), [10, 20, 30])
    part = weighting_from_config({"weighting": "distance", "weighting_mode": "cosine", "other": 1})
    np.testing.assert_allclose(part(info), [1.0, 0.5, 0.5])
    assert isinstance(weighting_from_config({}), WEIGHTINGS["examples"])
    with pytest.raises(ValueError, match="needs CohortInfo.label_counts"):
        make_weighting("label_importance")(CohortInfo(num_examples=[1, 2]))
    with pytest.raises(ValueError, match="unknown"):
        make_weighting("by_magic")
    with pytest.raises(ValueError, match="weighting 'uniform'"):
        make_weighting("uniform", floor=0.1)
    with pytest.raises(ValueError, match="unexpected keyword argument 'flor'"):
        make_weighting("loss_improvement", flor=0.1)
    with pytest.raises(ValueError, match="3 clients"):
        make_weighting("loss_improvement")(CohortInfo(num_examples=[1, 2, 3], loss_before=[1.0, 2.0], loss_after=[0.5, 1.0]))


def test_one_false_claim_cannot_carry_a_small_cohort_by_default():
    """Hardening 10: 10^12 claimed examples with a zero delta took 71% of a 5-client aggregate
    under a fixed 10x median cap; the default cap now scales with the cohort."""
    honest = [60, 55, 70, 65]
    old = np.minimum(honest + [10**12], 10 * np.median(honest + [10**12]))
    assert old[-1] / old.sum() > 0.7  # the fixed 10x cap
    w = examples(honest + [10**12])
    assert w[-1] / w.sum() < 0.52
    for n in (2, 3, 5, 8, 11, 21, 40):
        w = examples([100] * (n - 1) + [10**12])
        assert w[-1] / w.sum() <= min(0.5, 10 / (n + 9)) + 1e-12
    # A cohort of two: the plain median is the liar's half; the lower median is not.
    np.testing.assert_array_equal(examples([100, 10**12]), [100, 100])
    # An explicit ratio is kept as given; large cohorts keep the 10x cap.
    np.testing.assert_array_equal(examples([10, 10, 10, 10, 1000], max_examples_ratio=10), [10, 10, 10, 10, 100])
    assert claim_ratio(100) == 10 and claim_ratio(5) == 4 and claim_ratio(2) == 1


def test_the_engine_caps_a_false_claim_in_a_small_cohort():
    from fleetlearn.messages import Update

    c = build_coordinator(load_config({"data": {"clients": 10}, "server": {"rounds": 1, "cohort": 5}}), store=False)
    original = c.transport.dispatch

    def lying(task, cohort):
        for reply in original(task, cohort):
            msg = reply.message
            if isinstance(msg, Update) and msg.client_id == min(cohort):
                payload, _ = c.uplink.encode(torch.zeros(c.dim))
                reply = dataclasses.replace(reply, message=dataclasses.replace(msg, num_examples=10**12, payload=payload))
            yield reply

    c.transport.dispatch = lying
    rec = c.run_round()
    liar = next(cr for cr in rec.clients if cr.num_examples == 10**12)
    assert liar.status == "accepted" and liar.weight <= 0.5 + 1e-9
