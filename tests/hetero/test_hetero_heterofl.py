"""HeteroFL (Diao et al., ICLR 2021): width slicing, sub-models, overlapping aggregation."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from fleetlearn.aggregation import mean
from fleetlearn.learners import ClientData, FitConfig, TorchLearner, mlp
from fleetlearn.learners.heterofl import (
    HeteroFLPlan,
    coverage_mask,
    embed,
    heterofl_aggregate,
    kept_units,
    linear_layers,
    mlp_width_factory,
    sub_spec,
    width_slices,
)
from fleetlearn.params import ParamSpec

# mlp(3, 2, [4, 6]): 0.weight (4,3) @0, 0.bias (4,) @12, 2.weight (6,4) @16, 2.bias (6,) @40,
# 4.weight (2,6) @46, 4.bias (2,) @58; d = 60.
TINY = ParamSpec.from_module(mlp(3, 2, [4, 6]))


def test_kept_units_is_ceil_without_float_noise():
    assert kept_units(10, 0.3) == 3  # 0.3 * 10 = 3.0000000000000004 in floating point
    assert kept_units(128, 0.5) == 64 and kept_units(128, 0.25) == 32
    assert kept_units(3, 0.25) == 1 and kept_units(6, 0.25) == 2 and kept_units(1, 0.01) == 1
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        kept_units(4, 0.0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        kept_units(4, 1.5)


def test_width_slices_equal_hand_computed_indices():
    assert TINY.dim == 60
    # width 0.5 keeps 2 of 4 and 3 of 6 hidden units.
    expected = (
        [0, 1, 2, 3, 4, 5]  # 0.weight rows 0-1, all 3 input columns
        + [12, 13]  # 0.bias[:2]
        + [16, 17, 20, 21, 24, 25]  # 2.weight rows 0-2, columns 0-1 (row stride 4)
        + [40, 41, 42]  # 2.bias[:3]
        + [46, 47, 48, 52, 53, 54]  # 4.weight both output rows, columns 0-2 (row stride 6)
        + [58, 59]  # 4.bias: the output stays full
    )
    assert width_slices(TINY, 0.5).tolist() == expected
    # width 0.25 keeps 1 and 2 units.
    expected_q = [0, 1, 2, 12, 16, 20, 40, 41, 46, 47, 52, 53, 58, 59]
    assert width_slices(TINY, 0.25).tolist() == expected_q
    assert width_slices(TINY, 1.0).tolist() == list(range(60))
    s = sub_spec(TINY, 0.5)
    assert s.names == TINY.names
    assert s.shapes == ((2, 3), (2,), (3, 2), (3,), (2, 3), (2,))
    assert s.dim == len(expected)


def test_nested_widths_and_coverage():
    big, small = width_slices(TINY, 0.5), width_slices(TINY, 0.25)
    assert set(small.tolist()) <= set(big.tolist())
    m = coverage_mask(big, TINY.dim)
    assert m.dtype == torch.bool and int(m.sum()) == big.numel() and bool(m[big].all())
    v = torch.arange(1.0, big.numel() + 1)
    e = embed(v, big, TINY.dim)
    assert torch.equal(e[big], v) and int((e != 0).sum()) == big.numel()
    batch = embed(torch.stack([v, 2 * v]), big, TINY.dim)
    assert batch.shape == (2, TINY.dim) and torch.equal(batch[1], 2 * e)


def test_linear_layers_rejects_what_is_not_a_linear_chain():
    conv = ParamSpec.from_module(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4, 2)))
    with pytest.raises(ValueError, match="0.weight.*shape"):
        linear_layers(conv)
    broken = ParamSpec(("a.weight", "b.weight"), ((4, 3), (2, 5)))
    with pytest.raises(ValueError, match="takes 5 inputs.*4 outputs"):
        linear_layers(broken)
    no_bias = ParamSpec.from_module(nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 2, bias=False)))
    assert [(l.out_features, l.in_features, l.bias) for l in linear_layers(no_bias)] == [(4, 3, None), (2, 4, None)]
    assert width_slices(no_bias, 0.5).tolist() == [0, 1, 2, 3, 4, 5, 12, 13, 16, 17]


@pytest.mark.parametrize("width", [1.0, 0.5, 0.25, 0.3])
def test_sub_model_equals_truncated_full_model(width):
    torch.manual_seed(0)
    full = mlp(5, 3, [8, 6])
    spec = ParamSpec.from_module(full)
    g = spec.flatten(dict(full.named_parameters()))
    idx = width_slices(spec, width)
    sub = mlp_width_factory(5, 3, [8, 6])(width)
    s_spec = ParamSpec.from_module(sub)
    assert s_spec == sub_spec(spec, width)
    x = torch.randn(17, 5)
    out_sub = functional_call(sub, s_spec.split(g[idx]), (x,))
    # 1) By hand: the first k units of each hidden layer.
    k1, k2 = kept_units(8, width), kept_units(6, width)
    t = spec.split(g)
    h1 = torch.relu(x @ t["0.weight"][:k1].T + t["0.bias"][:k1])
    h2 = torch.relu(h1 @ t["2.weight"][:k2, :k1].T + t["2.bias"][:k2])
    by_hand = h2 @ t["4.weight"][:, :k2].T + t["4.bias"]
    assert torch.allclose(out_sub, by_hand, atol=1e-6)
    # 2) The full model with the other hidden units switched off (their incoming weights and
    #    biases zero, so ReLU(0) = 0 and they contribute nothing downstream).
    off = g.clone()
    w0, b0, w2, b2 = (spec.split(off)[n] for n in ("0.weight", "0.bias", "2.weight", "2.bias"))
    w0[k1:] = 0
    b0[k1:] = 0
    w2[k2:] = 0
    b2[k2:] = 0
    assert torch.allclose(out_sub, functional_call(full, spec.split(off), (x,)), atol=1e-6)


def _loop_reference(deltas_full, masks, weights):
    n, d = deltas_full.shape
    out = np.zeros(d)
    for j in range(d):
        num = den = 0.0
        for i in range(n):
            if masks[i, j]:
                num += float(weights[i]) * float(deltas_full[i, j])
                den += float(weights[i])
        out[j] = num / den if den > 0 else 0.0
    return torch.tensor(out, dtype=torch.float32)


@pytest.mark.parametrize("with_full_width", [True, False])
def test_aggregation_equals_loop_reference_in_every_form(with_full_width):
    g = torch.Generator().manual_seed(1)
    plan = HeteroFLPlan(TINY, (1.0, 0.5, 0.25), mlp_width_factory(3, 2, [4, 6]))
    widths = [1.0, 0.5, 0.25, 0.5, 0.25, 1.0, 0.25] if with_full_width else [0.5, 0.25, 0.5, 0.25]
    n = len(widths)
    subs = [torch.randn(plan.sub_dim(w), generator=g) for w in widths]
    weights = torch.rand(n, generator=g) * 10 + 0.5
    idx = [plan.index[w] for w in widths]
    full = torch.stack([embed(s, i, TINY.dim) for s, i in zip(subs, idx)])
    masks = torch.stack([coverage_mask(i, TINY.dim) for i in idx])
    ref = _loop_reference(full, masks, weights)
    if not with_full_width:
        assert int((ref == 0).sum()) >= TINY.dim - plan.sub_dim(0.5)  # nobody covers the outer units
    assert torch.allclose(heterofl_aggregate(full, masks, weights), ref, atol=1e-6)
    # Index form with full-size rows: entries off the index are ignored, so garbage there is harmless.
    noisy = full + (~masks) * 1e3
    assert torch.allclose(heterofl_aggregate(noisy, idx, weights), ref, atol=1e-6)
    assert torch.allclose(heterofl_aggregate(subs, idx, weights, dim=TINY.dim), ref, atol=1e-6)
    assert torch.allclose(plan.aggregate(widths, subs, weights), ref, atol=1e-6)
    # Every client covers the smallest sub-model: there it is the plain weighted mean.
    core = plan.index[0.25]
    assert torch.allclose(plan.aggregate(widths, subs, weights)[core], mean(full[:, core], weights), atol=1e-6)


def test_all_full_width_is_weighted_fedavg_bit_for_bit():
    spec = ParamSpec.from_module(mlp(64, 10, [128]))
    g = torch.Generator().manual_seed(2)
    deltas = torch.randn(9, spec.dim, generator=g) * 0.01
    weights = torch.rand(9, generator=g) * 20
    fedavg = mean(deltas, weights)
    plan = HeteroFLPlan(spec, (1.0,), mlp_width_factory(64, 10, [128]))
    idx = [plan.index[1.0]] * 9
    assert torch.equal(plan.aggregate([1.0] * 9, list(deltas), weights), fedavg)
    assert torch.equal(heterofl_aggregate(deltas, torch.ones_like(deltas, dtype=torch.bool), weights), fedavg)
    assert torch.equal(heterofl_aggregate(deltas, idx, weights), fedavg)
    assert torch.equal(heterofl_aggregate(list(deltas), idx, weights, dim=spec.dim), fedavg)


def test_aggregation_errors_name_the_problem():
    plan = HeteroFLPlan(TINY, (1.0, 0.5), mlp_width_factory(3, 2, [4, 6]))
    with pytest.raises(ValueError, match="empty cohort"):
        plan.aggregate([], [], [])
    with pytest.raises(ValueError, match="width 0.5 needs"):
        plan.aggregate([0.5], [torch.zeros(TINY.dim)], [1.0])
    with pytest.raises(ValueError, match="not one of this plan's widths"):
        plan.aggregate([0.25], [torch.zeros(3)], [1.0])
    with pytest.raises(ValueError, match="non-negative"):
        plan.aggregate([1.0], [torch.zeros(TINY.dim)], [-1.0])
    with pytest.raises(ValueError, match="pass dim"):
        heterofl_aggregate([torch.zeros(3)], [torch.arange(3)], [1.0])
    with pytest.raises(ValueError, match="outside"):
        heterofl_aggregate([torch.zeros(3)], [torch.tensor([0, 1, 99])], [1.0], dim=10)


def test_plan_checks_the_sub_model_factory():
    wrong = lambda w: mlp(3, 2, [max(1, int(w * 4)), max(1, int(w * 6))])  # floor, not ceil
    with pytest.raises(ValueError, match="width slicing of the global model gives"):
        HeteroFLPlan(TINY, (1.0, 0.3), wrong)
    with pytest.raises(ValueError, match="distinct"):
        HeteroFLPlan(TINY, (1.0, 1.0), mlp_width_factory(3, 2, [4, 6]))


def test_width_for_memory_tier_and_round_robin():
    plan = HeteroFLPlan.for_mlp(64, 10, [128], full_width_memory_mb=100.0)
    # d = 64*128 + 128 + 128*10 + 10 = 9610; width 0.5: 64*64 + 64 + 64*10 + 10 = 4810; 0.25: 2410.
    assert plan.dim == 9610 and plan.sub_dim(0.5) == 4810 and plan.sub_dim(0.25) == 2410
    assert math.isclose(plan.memory_required_mb(0.5), 100 * 4810 / 9610)
    got = plan.width_for_memory([1000.0, 100.0, 99.9, 50.1, 50.0, 25.1, 1.0])  # needs: 100, 50.05, 25.08 MB
    assert got.tolist() == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.25]
    assert plan.width_for_tier([0, 1, 2, 7]).tolist() == [1.0, 0.5, 0.25, 0.25]
    assert plan.round_robin(5).tolist() == [1.0, 0.5, 0.25, 1.0, 0.5]
    with pytest.raises(ValueError, match="full_width_memory_mb"):
        HeteroFLPlan.for_mlp(64, 10, [128]).width_for_memory([10.0])


def _clients(n, features=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        size = 4 + 3 * i
        out.append(ClientData(torch.randn(size, features, generator=g), torch.randint(0, classes, (size,), generator=g),
                              torch.randn(5, features, generator=g), torch.randint(0, classes, (5,), generator=g)))
    return out


def test_fit_cohort_trains_each_client_at_its_width_and_evaluates_it_there():
    plan = HeteroFLPlan.for_mlp(6, 3, [8, 8])
    params = plan.init_params(0)
    clients = _clients(6)
    widths = [1.0, 0.25, 0.5, 0.5, 1.0, 0.25]
    hp = FitConfig(local_epochs=2, batch_size=4, lr=0.1)
    seeds = list(range(10, 16))
    res = plan.fit_cohort(params, clients, widths, hp, seeds)
    for c, w, s, r in zip(clients, widths, seeds, res):
        alone = plan.learners[w].fit(plan.slice(params, w), c, hp, s)
        assert r.delta.numel() == plan.sub_dim(w)
        assert torch.allclose(r.delta, alone.delta, atol=1e-5)
    accs = plan.client_accuracy(params, clients, widths)
    for c, w, a in zip(clients, widths, accs):
        assert a == pytest.approx(plan.accuracy(params, w, c.x_test, c.y_test))
    # The width-1 learner is an ordinary TorchLearner on the full model.
    full = TorchLearner(lambda: mlp(6, 3, [8, 8]))
    assert torch.equal(plan.init_params(3), full.init_params(3))


def test_ensemble_logits_of_a_heterogeneous_cohort_equals_a_loop():
    from fleetlearn.learners.distill import logits

    plan = HeteroFLPlan.for_mlp(6, 3, [8])
    params = plan.init_params(1)
    g = torch.Generator().manual_seed(4)
    widths = [1.0, 0.5, 0.25, 0.5]
    deltas = [0.1 * torch.randn(plan.sub_dim(w), generator=g) for w in widths]
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0])
    x = torch.randn(11, 6, generator=g)
    got = plan.ensemble_logits(params, widths, deltas, x, weights)
    ref = sum(
        float(wt) * logits(plan.learners[w].module, plan.learners[w].spec, plan.slice(params, w) + d, x)
        for w, d, wt in zip(widths, deltas, weights)
    ) / float(weights.sum())
    assert torch.allclose(got, ref, atol=1e-5)


# The acceptance run (three widths within 2 pp of all full width) goes through the engine:
# tests/hetero/test_hetero_heterofl_engine.py.
