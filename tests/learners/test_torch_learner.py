import math

import pytest
import torch
from torch import nn

from fleetlearn.learners import ClientData, FitConfig, TorchLearner, batch_schedule, mlp


def _cohort(n=12, features=10, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        size = 1 + (i * 7) % 23  # unequal sizes, 1..23
        out.append(ClientData(
            torch.randn(size, features, generator=g), torch.randint(0, classes, (size,), generator=g),
            torch.randn(3, features, generator=g), torch.randint(0, classes, (3,), generator=g),
        ))
    return out


@pytest.mark.parametrize("hp", [
    FitConfig(local_epochs=2, batch_size=4, lr=0.1),
    FitConfig(local_epochs=1, batch_size=5, lr=0.05, momentum=0.9, weight_decay=1e-3),
    FitConfig(local_steps=7, batch_size=3, lr=0.05, prox_mu=0.5),
])
def test_vectorised_matches_sequential(hp):
    learner = TorchLearner(lambda: mlp(10, 4, [16]))
    params = learner.init_params(1)
    cohort = _cohort()
    seeds = list(range(100, 112))
    corr = 0.01 * torch.randn(len(cohort), learner.spec.dim, generator=torch.Generator().manual_seed(5))
    batched = learner.fit_cohort(params, cohort, hp, seeds, corr)
    assert not learner._vmap_failed
    seq = [learner.fit(params, c, hp, s, corr[i]) for i, (c, s) in enumerate(zip(cohort, seeds))]
    for b, s in zip(batched, seq):
        assert torch.allclose(b.delta, s.delta, atol=1e-5), float((b.delta - s.delta).abs().max())
        assert b.steps == s.steps and b.samples == s.samples and b.num_examples == s.num_examples
        assert math.isclose(b.loss_before, s.loss_before, rel_tol=1e-4)
        assert math.isclose(b.loss_after, s.loss_after, rel_tol=1e-4)
        assert math.isclose(b.accuracy, s.accuracy, rel_tol=1e-6)


def test_training_reduces_loss_and_is_deterministic():
    learner = TorchLearner(lambda: mlp(10, 4, [16]))
    params = learner.init_params(0)
    data = _cohort(1)[0]
    data = ClientData(torch.randn(64, 10), torch.randint(0, 4, (64,)), data.x_test, data.y_test)
    hp = FitConfig(local_epochs=20, batch_size=16, lr=0.2)
    a = learner.fit(params, data, hp, seed=3)
    b = learner.fit(params, data, hp, seed=3)
    c = learner.fit(params, data, hp, seed=4)
    assert a.loss_after < a.loss_before
    assert torch.equal(a.delta, b.delta) and not torch.equal(a.delta, c.delta)
    assert a.samples == 20 * 64 and a.steps == 20 * 4


def test_init_params_is_seeded_and_leaves_global_rng_alone():
    learner = TorchLearner(lambda: mlp(10, 4, [16]))
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    p1 = learner.init_params(7)
    after = torch.rand(1)
    assert torch.equal(before, after)
    assert torch.equal(p1, learner.init_params(7)) and not torch.equal(p1, learner.init_params(8))


def test_batch_schedule_covers_each_epoch_once():
    batches = batch_schedule(10, FitConfig(local_epochs=3, batch_size=4), 0)
    assert [len(b) for b in batches] == [4, 4, 2] * 3
    for e in range(3):
        assert sorted(torch.cat(batches[3 * e: 3 * e + 3]).tolist()) == list(range(10))
    steps = batch_schedule(10, FitConfig(local_steps=5, batch_size=4), 0)
    assert len(steps) == 5


class WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 8)
        self.bn = nn.BatchNorm1d(8)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        return self.out(torch.relu(self.bn(self.fc(x))))


def test_models_vmap_cannot_batch_fall_back_to_sequential():
    learner = TorchLearner(WithBatchNorm)
    params = learner.init_params(0)
    cohort = [c for c in _cohort(4) if c.num_examples > 1]
    res = learner.fit_cohort(params, cohort, FitConfig(batch_size=64), [1] * len(cohort))
    assert learner._vmap_failed
    assert len(res) == len(cohort) and all(torch.isfinite(r.delta).all() for r in res)


def test_corrections_shape_is_checked():
    learner = TorchLearner(lambda: mlp(10, 4, [16]))
    with pytest.raises(ValueError, match="corrections must be"):
        learner.fit_cohort(learner.init_params(0), _cohort(2), FitConfig(), [0, 1], torch.zeros(3, 5))


def test_batch_indices_give_each_client_its_own_schedule_whoever_else_trains():
    from fleetlearn.learners.torch_learner import batch_indices

    hp = FitConfig(local_epochs=3, batch_size=4)
    sizes, seeds = [10, 0, 3, 7], [11, 12, 13, 14]
    index, mask, epoch = batch_indices(sizes, hp, seeds)
    assert tuple(index.shape) == (4, 9, 4) and tuple(mask.shape) == (4, 9, 4)
    for c, (n, s) in enumerate(zip(sizes, seeds)):
        alone = batch_schedule(n, hp, s)
        ks = mask[c].sum(-1).to(torch.int64).tolist()
        mine = [index[c, t, :k] for t, k in enumerate(ks) if k]
        assert [b.tolist() for b in mine] == [b.tolist() for b in alone]  # the same batches as on its own
        per_epoch = -(-n // 4) if n else 0
        for e in range(3 if n else 0):  # each epoch a permutation of the client's rows
            rows = torch.cat(mine[e * per_epoch:(e + 1) * per_epoch]).tolist()
            assert sorted(rows) == list(range(n))
        assert (epoch[c] >= 0).sum() == 3 * per_epoch
    # The draw of one client does not depend on the others in the cohort, nor on its position.
    other, _, _ = batch_indices([7, 10], hp, [14, 11])
    assert torch.equal(other[0, :6, :4], index[3, :6, :4]) and torch.equal(other[1], index[0])
    # local_steps repeats epochs; a limit cuts a client's schedule; epochs differ from each other.
    steps, m, ep = batch_indices([10], FitConfig(local_steps=5, batch_size=4), [1], [None])
    assert int((m[0].sum(-1) > 0).sum()) == 5 and ep[0].tolist() == [0, 0, 0, 1, 1]
    _, m, ep = batch_indices([10, 10], hp, [1, 2], [2, None])
    assert int((m[0].sum(-1) > 0).sum()) == 2 and ep[0].tolist()[2:] == [-1] * 7
    first, second = batch_schedule(10, hp, 1)[:3], batch_schedule(10, hp, 1)[3:6]
    assert [b.tolist() for b in first] != [b.tolist() for b in second]


# -- engine.device -------------------------------------------------------------------------


@pytest.mark.parametrize("vectorize", [True, False])
def test_engine_device_auto_trains_where_cuda_is_and_the_system_keeps_cpu_vectors(vectorize):
    # "auto" is CUDA where there is one, else the CPU: the same run on "cpu" gives the same
    # bytes and the same model to float tolerance (on a CPU-only machine both are the CPU).
    from fleetlearn.config import load_config
    from fleetlearn.engine.factory import build_coordinator

    base = {"seed": 3, "data": {"clients": 12}, "server": {"rounds": 2, "cohort": 6},
            "client": {"local_epochs": 1, "momentum": 0.9}, "monitoring": {"detectors": []}}
    runs = {}
    for device in ("auto", "cpu"):
        c = build_coordinator(load_config({**base, "engine": {"device": device, "vectorize": vectorize}}), store=False)
        runs[device] = (c, c.run())
    (c_auto, s_auto), (c_cpu, s_cpu) = runs["auto"], runs["cpu"]
    assert c_auto.learner.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert c_cpu.learner.device.type == "cpu"
    assert c_auto.params.device.type == "cpu"  # the global vector, codecs and aggregation stay on the CPU
    assert [r.uplink_bytes for r in s_auto.records] == [r.uplink_bytes for r in s_cpu.records]
    torch.testing.assert_close(c_auto.params, c_cpu.params, atol=1e-4, rtol=1e-3)
    assert abs(s_auto.final_accuracy - s_cpu.final_accuracy) <= 0.02


def test_a_learner_on_a_device_returns_cpu_results():
    # What every caller gets back is on the CPU, wherever the learner computes.
    cohort = _cohort()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    learner = TorchLearner(lambda: mlp(10, 4, [16]), device=dev)
    params = learner.init_params(0)
    hp = FitConfig(lr=0.1, local_epochs=1, batch_size=4)
    for res in learner.fit_cohort(params, cohort, hp, list(range(len(cohort)))) + [learner.fit(params, cohort[0], hp, 0)]:
        assert res.delta.device.type == "cpu" and torch.isfinite(res.delta).all()
    losses, correct = learner.per_example(params, cohort[0].x, cohort[0].y)
    assert losses.device.type == "cpu" and correct.device.type == "cpu"
