"""Personalization parts: fine-tuning, FedPer, Ditto (fleetlearn.client.personalization)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fleetlearn.client.personalization import Ditto, FedPer, FineTune, head_indices, personal_seed
from fleetlearn.client import ClientStateStore
from fleetlearn.config import ConfigError, load_config
from fleetlearn.engine import build_coordinator
from fleetlearn.learners import ClientData, FitConfig, TorchLearner
from fleetlearn.learners.models import mlp
from fleetlearn.params import ParamSpec


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small(method: str = "none", rounds: int = 2, **personal) -> dict:
    return {
        "data": {"alpha": 0.1, "clients": 40},
        "client": {"local_epochs": 2},
        "server": {"rounds": rounds, "cohort": 8},
        "personalization": {"method": method, **personal},
        "monitoring": {"debug": False},
    }


def toy_clients(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in range(n):
        k = 10 + 3 * c
        x = torch.randn(k, 6, generator=g)
        y = (x[:, c % 6] > 0).long() + (c % 2)
        out.append(ClientData(x[:-3], y[:-3], x[-3:], y[-3:]))
    return out


# -- configuration ---------------------------------------------------------------------------


def test_bad_values_are_config_errors_naming_the_key():
    with pytest.raises(ConfigError, match=r"personalization\.method = 'fedprox'"):
        load_config(small("fedprox"))
    with pytest.raises(ConfigError, match=r"personalization\.finetune_steps"):
        load_config(small("finetune", finetune_steps=0))
    with pytest.raises(ConfigError, match=r"personalization\.ditto_lambda"):
        load_config(small("ditto", ditto_lambda=-1.0))
    assert load_config({**small("ditto"), "engine": {"backend": "ray"}}).engine.backend == "ray"  # the Ray workers run it too
    cfg = small("finetune")
    cfg["data"]["local_test_fraction"] = 0.0
    with pytest.raises(ConfigError, match="local_test_fraction"):
        load_config(cfg)
    with pytest.raises(ConfigError, match=r"personalization\.head = 'classifier\.'.*no parameter name starts with"):
        build_coordinator(load_config(small("fedper", head="classifier.")), store=False)
    with pytest.raises(ConfigError, match=r"personalization\.head = ' '"):
        load_config(small("fedper", head=" "))


def test_head_indices_last_layer_and_prefix():
    spec = ParamSpec.from_module(mlp(64, 10, [128]))  # 0.weight, 0.bias, 2.weight, 2.bias
    last = head_indices(spec, "last")
    assert last.tolist() == list(range(64 * 128 + 128, spec.dim))
    first = head_indices(spec, "0.")
    assert first.tolist() == list(range(0, 64 * 128 + 128))
    with pytest.raises(ValueError, match="selects every tensor"):
        head_indices(spec, "")


# -- the learner: per-client start points and a prox anchor -----------------------------------


def test_per_client_starts_and_anchor_batched_equal_one_by_one():
    learner = TorchLearner(lambda: mlp(6, 3, [8]))
    clients = toy_clients()
    w = learner.init_params(0)
    starts = w + 0.1 * torch.randn(len(clients), w.numel(), generator=torch.Generator().manual_seed(1))
    hp = FitConfig(local_epochs=2, batch_size=4, lr=0.1, momentum=0.9, prox_mu=0.5)
    seeds = [3, 4, 5, 6]
    batched = learner.fit_cohort(starts, clients, hp, seeds, anchor=w)
    for i, (c, r) in enumerate(zip(clients, batched)):
        one = learner.fit(starts[i], c, hp, seeds[i], anchor=w)
        torch.testing.assert_close(r.delta, one.delta, atol=1e-5, rtol=1e-4)
    # the anchor matters: prox around the start point gives another result
    around_start = learner.fit(starts[0], clients[0], hp, seeds[0])
    assert not torch.allclose(around_start.delta, batched[0].delta, atol=1e-4)
    acc = learner.cohort_test_accuracy(starts, clients)
    for i, c in enumerate(clients):
        assert acc[i] == pytest.approx(learner._accuracy(starts[i], c.x_test, c.y_test))


# -- the parts ---------------------------------------------------------------------------------


def test_ditto_personal_step_is_prox_training_around_the_global_model():
    """v_k <- v_k trained on F_k(v) + lambda/2 ||v - w||^2, from the stored v_k (first time: w)."""
    learner = TorchLearner(lambda: mlp(6, 3, [8]))
    clients = toy_clients()
    ids = [7, 3, 11, 20]
    w = learner.init_params(0)
    hp = FitConfig(local_epochs=1, batch_size=4, lr=0.1)
    part = Ditto(lam=0.3, epochs=2)
    store = ClientStateStore()
    v_old = w + 0.05
    store.put(3, {"personal": v_old.clone()})  # client 3 already has a personal model
    seeds = [1, 2, 3, 4]
    results = part.fit_cohort(learner, w, ids, clients, hp, seeds, store)
    # global training unchanged
    plain = learner.fit_cohort(w, clients, hp, seeds)
    for a, b in zip(results, plain):
        torch.testing.assert_close(a.delta, b.delta)
    ditto_hp = FitConfig(local_epochs=2, batch_size=4, lr=0.1, prox_mu=0.3)
    for i, (c, data) in enumerate(zip(ids, clients)):
        start = v_old if c == 3 else w
        ref = learner.fit(start, data, ditto_hp, personal_seed(seeds[i]), anchor=w)
        torch.testing.assert_close(store.get(c)["personal"], start + ref.delta, atol=1e-5, rtol=1e-4)
        assert results[i].personal_accuracy == pytest.approx(learner._accuracy(start + ref.delta, data.x_test, data.y_test))
        assert results[i].global_accuracy == pytest.approx(learner._accuracy(w, data.x_test, data.y_test))
    assert len(store) == 4


def test_fedper_keeps_heads_on_the_client_and_uploads_the_body_only():
    learner = TorchLearner(lambda: mlp(6, 3, [8]))
    part = FedPer(learner.spec, "last")
    head = part.index
    clients = toy_clients()
    ids = [5, 9, 2, 0]
    w = learner.init_params(0)
    store = ClientStateStore()
    own = torch.randn(head.numel(), generator=torch.Generator().manual_seed(2))
    store.put(9, {"head": own.clone()})
    hp = FitConfig(local_epochs=1, batch_size=4, lr=0.1)
    results = part.fit_cohort(learner, w, ids, clients, hp, [1, 2, 3, 4], store)
    # client 9 trained from (global body, its own head)
    start = w.clone()
    start[head] = own
    ref = learner.fit(start, clients[1], hp, 2)
    torch.testing.assert_close(results[1].delta, ref.delta, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(store.get(9)["head"], own + ref.delta[head], atol=1e-5, rtol=1e-4)
    assert all(store.get(c)["head"].shape == head.shape for c in ids)  # heads only, not whole models
    # what leaves the device: the body's delta, zeros on the head
    out = part.outgoing(results[1].delta)
    assert torch.all(out[head] == 0)
    body = torch.ones(w.numel(), dtype=torch.bool)
    body[head] = False
    torch.testing.assert_close(out[body], results[1].delta[body])
    # personal model = (global body, own new head)
    personal = w.clone()
    personal[head] = store.get(9)["head"]
    assert results[1].personal_accuracy == pytest.approx(learner._accuracy(personal, clients[1].x_test, clients[1].y_test))


def test_finetune_evaluates_the_fine_tuned_global_model():
    learner = TorchLearner(lambda: mlp(6, 3, [8]))
    clients = toy_clients()
    w = learner.init_params(0)
    hp = FitConfig(local_epochs=1, batch_size=4, lr=0.1, momentum=0.9, prox_mu=0.2)
    part = FineTune(steps=3, lr=0.05)
    personal, glob = part.evaluate(learner, w, [0, 1, 2, 3], clients, hp, [5, 6, 7, 8], ClientStateStore())
    ft = FitConfig(local_epochs=1, local_steps=3, batch_size=4, lr=0.05, momentum=0.9)
    for i, c in enumerate(clients):
        ref = learner.fit(w, c, ft, personal_seed(5 + i))
        assert personal[i] == pytest.approx(learner._accuracy(w + ref.delta, c.x_test, c.y_test))
        assert glob[i] == pytest.approx(learner._accuracy(w, c.x_test, c.y_test))


# -- in the engine -------------------------------------------------------------------------------


def run(cfg):
    coord = build_coordinator(load_config(cfg), store=False)
    return coord, coord.run()


def test_finetune_and_ditto_leave_global_training_unchanged():
    _, base = run(small("none"))
    for method in ("finetune", "ditto"):
        coord, s = run(small(method))
        assert s.final_accuracy == base.final_accuracy
        assert [r.loss for r in s.records] == [r.loss for r in base.records]
        assert all(r.personal_accuracy == r.personal_accuracy for r in s.records)  # measured (not nan)


def test_records_and_summary():
    coord, s = run(small("ditto", rounds=2))
    first = s.records[0]
    w0 = coord.learner.init_params(coord.config.seed)
    transport = coord.transport
    accepted = [c for c in first.clients if c.status == "accepted"]
    assert accepted
    for c in accepted:  # the global accuracy a client reports is the received model's on its local test split
        data = transport.client_data(c.client_id)
        assert c.global_accuracy == pytest.approx(coord.learner._accuracy(w0, data.x_test, data.y_test), nan_ok=True)
        assert math.isnan(c.personal_accuracy) == (data.y_test.numel() == 0)
    assert first.personal_gain == pytest.approx(first.personal_accuracy - first.personal_global_accuracy)
    assert first.personal_accuracy == pytest.approx(np.nanmean([c.personal_accuracy for c in accepted]))
    final = s.records[-1].extra["personalization"]
    assert final["method"] == "ditto" and final["clients"] == len(coord.evaluator.clients)
    assert s.personal_accuracy == final["personal_accuracy"] and s.personal_gain == pytest.approx(final["gain"])
    # the final global accuracy on local test splits is the federated evaluation's
    assert final["global_accuracy"] == pytest.approx(s.records[-1].fed_accuracy)
    # state only for clients that trained (never the whole population)
    trained = {c.client_id for r in s.records for c in r.clients if c.status == "accepted"}
    assert len(coord.transport.device.personal_states) == len(trained) < coord.transport.population
    json_summary = s.to_json_dict()
    assert json_summary["personal_accuracy"] == final["personal_accuracy"]


def test_fedper_server_head_never_moves():
    coord, s = run(small("fedper", rounds=3))
    head = coord.transport.device.personalization.index
    w0 = coord.learner.init_params(coord.config.seed)
    torch.testing.assert_close(coord.params[head], w0[head])
    body = torch.ones(w0.numel(), dtype=torch.bool)
    body[head] = False
    assert not torch.allclose(coord.params[body], w0[body])
    heads = coord.transport.device.personal_states
    from fleetlearn.client.state_store import ENTRY_BYTES, TENSOR_BYTES

    assert len(heads) > 0 and heads.nbytes() == len(heads) * (ENTRY_BYTES + TENSOR_BYTES + head.numel() * 4)  # one head tensor each


def test_acceptance_personalized_beat_global_under_dirichlet_01():
    """Digits, Dirichlet(0.1), 100 clients, 5 rounds of the default job: the fine-tuned
    personal models beat the global model on the clients' local test splits by >= 5 pp."""
    cfg = {"data": {"alpha": 0.1}, "server": {"rounds": 5}, "personalization": {"method": "finetune"}, "monitoring": {"debug": False}}
    _, s = run(cfg)
    assert s.personal_gain >= 0.05, (s.personal_accuracy, s.personal_global_accuracy)


def test_fedper_head_stays_zero_through_local_dp_and_the_codec():
    from fleetlearn.client import Device
    from fleetlearn.learners import TorchLearner
    from fleetlearn.compression import parse_chain
    from fleetlearn.learners.base import FitResult
    from fleetlearn.messages import Task

    spec = ParamSpec.from_module(mlp(6, 3, [8]))
    part = FedPer(spec, "last")
    chain = parse_chain("none")
    runtime = Device(TorchLearner(lambda: mlp(6, 3, [8])), chain, chain, personalization=part)
    task = Task(round=1, version=0, payload=b"", codec="none", spec={"local_dp": {"clip_norm": 0.5, "noise_multiplier": 1.0}})
    delta = torch.randn(spec.dim, generator=torch.Generator().manual_seed(0))
    result = FitResult(delta=delta, num_examples=5, loss_before=1.0, loss_after=0.5, accuracy=0.5, steps=1, samples=5, compute_seconds=0.0)
    sent = chain.decode(runtime.reply(3, task, result).payload, dim=spec.dim)
    assert torch.all(sent[part.index] == 0)
    body = torch.ones(spec.dim, dtype=torch.bool)
    body[part.index] = False
    assert torch.count_nonzero(sent[body]) == int(body.sum())  # the body is sent (clipped and noised)
