"""A TorchLearner shared by threads (several gRPC clients in one process) trains each
client exactly as it would alone, and still pickles (Ray ships learners to workers)."""

from __future__ import annotations

import pickle
import threading

import torch

from fleetlearn.learners import ClientData, FitConfig, TorchLearner, mlp


def _data(seed: int) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return ClientData(x[:48], y[:48], x[48:], y[48:])


def test_concurrent_fits_equal_sequential_ones():
    learner = TorchLearner(lambda: mlp(8, 3, [64]), vectorize=False)
    params = learner.init_params(0)
    hp = FitConfig(lr=0.1, local_epochs=5, batch_size=4)
    alone = [learner.fit(params, _data(i), hp, seed=i).delta for i in range(4)]
    got: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def work(i: int) -> None:
        try:
            start.wait()
            for _ in range(3):
                got[i] = learner.fit(params, _data(i), hp, seed=i).delta
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    for i in range(4):
        assert torch.equal(got[i], alone[i])


def test_a_learner_used_from_threads_still_pickles():
    learner = TorchLearner(lambda: mlp(8, 3, [16]), vectorize=False)
    t = threading.Thread(target=lambda: learner.fit(learner.init_params(0), _data(0), FitConfig(), seed=0))
    t.start()
    t.join(30)
    assert len(learner._thread_modules) == 1  # the thread got its own module
    copy = pickle.loads(pickle.dumps(_picklable(learner)))
    assert copy.spec.dim == learner.spec.dim and copy._thread_modules == {} and copy.module is copy._module


def _picklable(learner: TorchLearner) -> TorchLearner:
    # make_module is a lambda (Ray uses cloudpickle for those); swap in a named factory.
    learner.make_module = _factory
    return learner


def _factory():
    return mlp(8, 3, [16])
