"""SCAFFOLD (Karimireddy et al. 2020, option II): the control-variate algebra, the control
variate travelling in the Task (and counted in the downlink bytes), the invariant
c = (1/N) sum_i c_i through the real engine, and the configurations it refuses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fleetlearn.config import ConfigError, load_config
from fleetlearn.engine import build_coordinator
from fleetlearn.learners.scaffold import CLIENT_KEY, SERVER_KEY, control_deltas, effective_steps, server_control_step

torch.set_num_threads(1)


def small(**over) -> dict:
    cfg = {
        "seed": 3,
        "data": {"dataset": "digits", "clients": 12, "alpha": 0.1},
        "model": {"hidden": [16]},
        "client": {"local_steps": 6, "batch_size": 8, "lr": 0.05, "momentum": 0.0, "objective": "scaffold"},
        "server": {"rounds": 3, "cohort": 12},
        "monitoring": {"debug": False, "detectors": []},
    }
    for section, values in over.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    return cfg


def coordinator(**over):
    return build_coordinator(load_config(small(**over)), store=False)


def mean_client_control(coord) -> torch.Tensor:
    """(1/N) sum_i c_i over the whole population (clients without state count as 0)."""
    total = torch.zeros(coord.dim)
    for cid in coord.client_states.clients():
        total += coord.client_states.get(cid)[CLIENT_KEY]
    return total / coord.transport.population


# -- algebra ---------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9])
def test_effective_steps_is_the_distance_momentum_sgd_travels_along_a_constant_gradient(beta):
    for k in (1, 2, 7, 30):
        # torch.optim.SGD semantics, the same as the learner: buf = g, then buf = beta buf + g.
        buf, moved = None, 0.0
        for _ in range(k):
            buf = 1.0 if buf is None else beta * buf + 1.0
            moved += buf
        assert float(effective_steps([k], beta)[0]) == pytest.approx(moved, rel=1e-12)
    assert effective_steps([0, 5], 0.0).tolist() == [0.0, 5.0]


def test_control_deltas_is_option_two_row_by_row():
    g = torch.Generator().manual_seed(0)
    deltas, c = torch.randn(4, 6, generator=g), torch.randn(6, generator=g)
    steps, lr = [3, 1, 0, 10], 0.1
    out = control_deltas(deltas, steps, lr, 0.0, c)
    for i, k in enumerate(steps):
        want = torch.zeros(6) if k == 0 else -c - deltas[i] / (k * lr)
        assert torch.allclose(out[i], want, atol=1e-6)
    # The server step adds sum_i delta_c_i / N = (|S|/N) * mean_i delta_c_i.
    new = server_control_step(c, out, population=10)
    assert torch.allclose(new, c + (4 / 10) * out.mean(0), atol=1e-6)
    with pytest.raises(ValueError, match="deltas must be"):
        control_deltas(deltas, steps, lr, 0.0, torch.zeros(5))


# -- through the engine ------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_server_control_is_the_mean_of_client_controls_under_full_participation(momentum):
    coord = coordinator(client={"momentum": momentum})
    for _ in range(3):
        rec = coord.run_round()
        assert rec.accepted == 12
        c = coord.server_state[SERVER_KEY]
        assert float(c.norm()) > 0
        assert torch.allclose(c, mean_client_control(coord), atol=1e-5)


def test_invariant_holds_with_partial_participation_and_absent_clients_count_zero():
    coord = coordinator(server={"cohort": 4, "rounds": 4})
    for _ in range(4):
        coord.run_round()
    assert 4 <= len(coord.client_states) < 12  # some clients never trained: no state, no memory
    assert torch.allclose(coord.server_state[SERVER_KEY], mean_client_control(coord), atol=1e-5)


def test_first_round_equals_fedavg_then_the_correction_changes_the_trajectory():
    scaf, plain = coordinator(), coordinator(client={"objective": "plain"})
    scaf.run_round(), plain.run_round()
    assert torch.equal(scaf.params, plain.params)  # c = c_i = 0: no correction yet
    scaf.run_round(), plain.run_round()
    assert not torch.allclose(scaf.params, plain.params, atol=1e-4)


def test_control_variate_travels_in_the_task_and_is_counted_in_downlink_bytes():
    scaf, plain = coordinator(), coordinator(client={"objective": "plain"})
    r_s, r_p = scaf.run_round(), plain.run_round()
    # The Task carries params and c, both float32 (d,) in the same wire format.
    assert r_s.downlink_bytes == 2 * r_p.downlink_bytes
    assert all(c.downlink_bytes == 2 * r_p.clients[0].downlink_bytes for c in r_s.clients)
    assert not any(k.startswith("scaffold") for k in plain.server_state)


def test_scaffold_beats_or_matches_fedavg_on_a_label_skewed_problem():
    # One class per client (shards), full participation: client drift is at its worst.
    over = dict(data={"clients": 10, "partition": "shards", "shards_per_client": 1}, server={"cohort": 10, "rounds": 12},
                client={"local_steps": 10, "lr": 0.05})
    scaf = build_coordinator(load_config(small(**over)), store=False).run()
    over["client"] = {**over["client"], "objective": "plain"}
    avg = build_coordinator(load_config(small(**over)), store=False).run()
    last = lambda s: float(np.mean([r.accuracy for r in s.records[-3:]]))  # noqa: E731
    assert last(scaf) >= last(avg) + 0.05  # (0.72 vs 0.46 at this seed)


@pytest.mark.parametrize(
    "over, match",
    [
        ({"server": {"mode": "async"}}, "synchronous rounds only"),
        ({"compression": {"uplink": "sketch:0.05"}}, "summed sketch"),
        ({"privacy": {"mode": "central"}}, "central DP"),
    ],
)
def test_refused_configurations_name_the_key(over, match):
    with pytest.raises(ConfigError, match=match) as err:
        build_coordinator(load_config(small(**over)), store=False)
    assert "client.objective" in str(err.value)


def test_grpc_server_asks_clients_for_scaffold(tmp_path):
    pytest.importorskip("grpc")
    from fleetlearn.transport.grpc.commands import server_transport

    t = server_transport(load_config(small()), spec=None, address="127.0.0.1:0", state_dir=tmp_path)
    try:
        assert t.requirements.features == ("scaffold",)  # clients without it are refused at registration
    finally:
        t.close(grace_s=0.1)


def test_the_example_config_runs_scaffold():
    from pathlib import Path

    cfg = load_config(Path(__file__).parents[2] / "examples" / "non_iid.toml", ["server.rounds=2"])
    assert cfg.client.objective == "scaffold" and cfg.data.alpha == 0.1
    rec = build_coordinator(cfg, store=False).run().records[-1]
    assert rec.status == "ok" and rec.accepted == 10
