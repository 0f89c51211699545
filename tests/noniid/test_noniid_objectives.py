"""Through the real engine: FedProx with mu = 0 is FedAvg exactly, and FedAdam with
beta1 = 0, beta2 = 0 and a large tau is FedAvg with server learning rate server_lr / tau
(the reduction documented in ServerAdam's docstring and the README)."""

from __future__ import annotations

import pytest
import torch

from fleetlearn.config import load_config
from fleetlearn.engine import build_coordinator

torch.set_num_threads(1)


def run(client=None, server=None):
    cfg = load_config({
        "seed": 7,
        "data": {"dataset": "digits", "clients": 20, "alpha": 0.1},
        "model": {"hidden": [16]},
        "client": {"local_steps": 5, "batch_size": 8, **(client or {})},
        "server": {"rounds": 4, "cohort": 8, **(server or {})},
        "monitoring": {"debug": False, "detectors": []},
    })
    coord = build_coordinator(cfg, store=False)
    summary = coord.run()
    return coord, summary


def test_fedprox_with_mu_zero_equals_fedavg_exactly():
    avg, s_avg = run()
    prox, s_prox = run(client={"objective": "prox", "prox_mu": 0.0})
    assert torch.equal(prox.params, avg.params)
    assert [r.accuracy for r in s_prox.records] == [r.accuracy for r in s_avg.records]
    # ...and the proximal term is really applied when mu > 0 (the equality is not vacuous).
    prox1, _ = run(client={"objective": "prox", "prox_mu": 1.0})
    assert not torch.allclose(prox1.params, avg.params, atol=1e-4)


def test_fedadam_beta1_zero_large_tau_is_fedavg_with_server_lr_over_tau():
    tau = 1e4
    avg, _ = run()  # server_lr = 1
    adam, _ = run(server={"optimizer": "adam", "server_beta1": 0.0, "server_beta2": 0.0, "server_tau": tau, "server_lr": tau})
    # step = lr Delta / (|Delta| + tau) = Delta (1 - |Delta|/tau + ...): relative error ~ max|Delta| / tau.
    moved = (avg.params - avg.learner.init_params(7)).abs().max()
    assert float(moved) > 0.05
    assert torch.allclose(adam.params, avg.params, atol=float(moved) * 1e-3)
    # A small tau is a different optimizer altogether (sign-like steps).
    sign_like, _ = run(server={"optimizer": "adam", "server_beta1": 0.0, "server_beta2": 0.0, "server_tau": 1e-3, "server_lr": 1e-3})
    assert not torch.allclose(sign_like.params, avg.params, atol=float(moved) * 1e-2)


@pytest.mark.parametrize("objective", ["prox", "scaffold"])
def test_objective_name_is_validated(objective):
    cfg = load_config({"client": {"objective": objective}})
    assert cfg.client.objective == objective
    from fleetlearn.config import ConfigError

    with pytest.raises(ConfigError, match="client.objective"):
        load_config({"client": {"objective": "fedfoo"}})
