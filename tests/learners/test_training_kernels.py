"""`[engine] training_kernels = "compiled"`: the batched SGD step compiled with torch.compile
agrees with the eager step (to float rounding) for every option of the local objective,
falls back to eager steps with one warning when compiling fails or no compiler exists, is
set on every learner a run builds, and never travels to another process compiled."""

from __future__ import annotations

import functools
import logging
import math
import pickle

import pytest
import torch

from fleetlearn import toolchain
from fleetlearn.config import ConfigError, load_config
from fleetlearn.learners import ClientData, FitConfig, TorchLearner, mlp
from fleetlearn.learners import torch_learner
from fleetlearn.learners.torch_learner import set_training_kernels

needs_compiler = pytest.mark.skipif(toolchain.compiler() is None, reason="no C++ compiler for torch.compile")

FEATURES, CLASSES = 12, 5


def _cohort(n: int = 24, seed: int = 0) -> list[ClientData]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        size = 0 if i == 3 else 1 + (i * 7) % 23  # unequal sizes, and one client without data
        out.append(ClientData(
            torch.randn(size, FEATURES, generator=g), torch.randint(0, CLASSES, (size,), generator=g),
            torch.randn(3, FEATURES, generator=g), torch.randint(0, CLASSES, (3,), generator=g),
        ))
    return out


def _learner(kernels: str = "eager") -> TorchLearner:
    learner = TorchLearner(functools.partial(mlp, FEATURES, CLASSES, [16]))  # picklable
    learner.kernels = kernels
    return learner


def _fit(learner, hp, corrected: bool):
    cohort = _cohort()
    params = learner.init_params(1)
    corr = 0.01 * torch.randn(len(cohort), learner.spec.dim, generator=torch.Generator().manual_seed(5)) if corrected else None
    return learner.fit_cohort(params, cohort, hp, list(range(100, 100 + len(cohort))), corr)


def _assert_close(a, b, atol: float) -> None:
    for x, y in zip(a, b):
        assert torch.allclose(x.delta, y.delta, atol=atol), float((x.delta - y.delta).abs().max())
        assert x.steps == y.steps and x.samples == y.samples and x.num_examples == y.num_examples
        for u, v in ((x.loss_before, y.loss_before), (x.loss_after, y.loss_after)):
            assert (math.isnan(u) and math.isnan(v)) or math.isclose(u, v, rel_tol=1e-4, abs_tol=1e-6)


# Two kernels: plain SGD, and every option at once (FedProx's term, SCAFFOLD's corrections,
# weight decay, momentum).  Each is then called again with half the learning rate: the rates
# are tensors, so the same kernel serves both.
@needs_compiler
@pytest.mark.parametrize("hp,corrected", [
    (FitConfig(local_epochs=2, batch_size=4, lr=0.1), False),
    (FitConfig(local_epochs=2, batch_size=5, lr=0.05, momentum=0.9, weight_decay=1e-3, prox_mu=0.5), True),
], ids=["sgd", "prox+scaffold+decay+momentum"])
def test_compiled_step_agrees_with_eager(hp, corrected):
    eager = _fit(_learner(), hp, corrected)
    learner = _learner("compiled")
    compiled = _fit(learner, hp, corrected)
    assert list(learner._steps.values()) and all(v is not None for v in learner._steps.values())
    _assert_close(compiled, eager, atol=1e-5)
    assert any(float(r.delta.abs().max()) > 1e-3 for r in compiled)  # it trained
    # A new learning rate reuses the kernel (no recompilation needed for a schedule).
    hp2 = FitConfig(**{**hp.__dict__, "lr": hp.lr / 2})
    _assert_close(_fit(learner, hp2, corrected), _fit(_learner(), hp2, corrected), atol=1e-5)
    assert len(learner._steps) == 1


def test_failed_compile_warns_once_and_trains_eager(monkeypatch, caplog):
    def broken(*args, **kwargs):
        def step(*a, **k):
            raise RuntimeError("inductor exploded\nmore detail")
        return step

    monkeypatch.setattr(torch_learner, "compiled_step", broken)
    monkeypatch.setattr(toolchain, "_compiler", "/usr/bin/c++")  # as if a compiler were there
    hp = FitConfig(local_epochs=1, batch_size=4, lr=0.1, momentum=0.9)
    learner = _learner("compiled")
    with caplog.at_level(logging.WARNING, logger="fleetlearn.learners.torch_learner"):
        out = _fit(learner, hp, False)
        again = _fit(learner, hp, False)
    warnings = [r.getMessage() for r in caplog.records if "training_kernels" in r.getMessage()]
    assert len(warnings) == 1 and "RuntimeError: inductor exploded" in warnings[0] and "eager" in warnings[0], warnings
    eager = _fit(_learner(), hp, False)
    for a, b, c in zip(out, again, eager):  # the eager arithmetic exactly, from the first step
        assert torch.equal(a.delta, c.delta) and torch.equal(b.delta, c.delta)
    assert list(learner._steps.values()) == [None]


def test_no_compiler_warns_and_trains_eager(monkeypatch, caplog):
    monkeypatch.setattr(toolchain, "_compiler", None)
    hp = FitConfig(local_epochs=1, batch_size=4, lr=0.1)
    learner = _learner("compiled")
    with caplog.at_level(logging.WARNING, logger="fleetlearn.learners.torch_learner"):
        out = _fit(learner, hp, False)
    assert any("no C++ compiler" in r.getMessage() for r in caplog.records)
    for a, b in zip(out, _fit(_learner(), hp, False)):
        assert torch.equal(a.delta, b.delta)


def test_compiled_kernels_stay_in_their_process():
    learner = _learner("compiled")
    learner._steps[(False, False, False, False)] = lambda *a: None
    copy = pickle.loads(pickle.dumps(learner))
    assert copy.kernels == "compiled" and copy._steps == {}


def test_the_setting_reaches_every_learner_of_a_run():
    from fleetlearn.data import load_federated
    from fleetlearn.engine.factory import build_learner

    cfg = load_config({"data": {"dataset": "synthetic", "clients": 6}, "server": {"cohort": 4}, "engine": {"training_kernels": "compiled"},
                       "model": {"widths": [1.0, 0.5], "width_rule": "round_robin", "hidden": [16]}})
    learner = build_learner(cfg, load_federated(cfg.data, cfg.seed))
    inner = list(learner.plan.learners.values())
    assert len(inner) == 2 and all(isinstance(x, TorchLearner) and x.kernels == "compiled" for x in inner)
    plain = build_learner(load_config({"data": {"dataset": "synthetic", "clients": 6}, "server": {"cohort": 4}}), load_federated(cfg.data, cfg.seed))
    assert plain.kernels == "eager"
    with pytest.raises(ValueError, match="training_kernels: allowed: eager, compiled"):
        set_training_kernels(plain, "fast")


def test_config_refuses_an_unknown_mode():
    with pytest.raises(ConfigError, match="training_kernels"):
        load_config({"engine": {"training_kernels": "fast"}})


def test_compiled_steps_train_in_cache_sized_groups():
    # The 64-128-10 MLP (9,610 parameters; its largest tensor 128 x 64): eager groups as large
    # as keeps one parameter's (clients, 128, 64) tensor under glibc's 32 MiB heap blocks
    # (1,023 clients); compiled steps are fastest with a group's parameters in the last-level
    # cache (4 MiB: 109).
    learner = TorchLearner(functools.partial(mlp, 64, 10, [128]))
    assert learner.group_size() == ((32 << 20) - 1) // (4 * 128 * 64) == 1023
    learner.kernels = "compiled"
    assert learner.group_size() == (4 << 20) // (4 * 9610) == 109
    # A model of many tensors: its groups' parameters all together stay within 64 MiB.
    wide = TorchLearner(functools.partial(mlp, 64, 10, [256] * 12))
    d = wide.spec.dim
    assert max(wide.spec.sizes) == 256 * 256 and wide.group_size() == max(32, (64 << 20) // (4 * d)) < ((32 << 20) - 1) // (4 * 256 * 256)
    # A model whose largest tensor alone is large: at least MIN_GROUP clients.
    big = TorchLearner(functools.partial(mlp, 784, 10, [2048]))
    assert big.group_size() == 32
