"""Red-team clients over gRPC: `fleetlearn client --attack KIND` makes a real client a
malicious one, through the one client device, with the simulation's attack math (its own
update only, never colluding).  The server-side `[attack]` stays refused: a real server
controls no client."""

from __future__ import annotations

import threading

import pytest
import torch
from grpc_test_support import CLASSES, NetworkRun, make_task, tiny_data

from fleetlearn.attacks import Attack, client_attack
from fleetlearn.compression import parse_chain
from fleetlearn.config import ConfigError, load_config
from fleetlearn.engine import build_coordinator
from fleetlearn.messages import Update
from fleetlearn.transport import client_seed
from fleetlearn.transport.grpc import Backoff, commands, run_client

COHORT = 5  # the cohort size the red-team clients assume (model_replacement's boost)
# (kind, options, start_round): one red-team client each, and one honest client (kind "none").
DRILL = [
    ("none", {}, 1),
    ("sign_flip", {}, 1),
    ("scaling", {"scale": 3.0}, 1),
    ("gaussian", {"noise_std": 0.5}, 1),
    ("label_flip", {}, 1),
    ("alie", {"alie_z": 1.5}, 1),
    ("same_value", {"value": -2.0}, 1),
    ("model_replacement", {}, 2),  # honest in round 1, attacking from round 2
]


def test_a_red_team_clients_update_is_the_simulations_attack_on_its_row(transport, tokens, learner):
    names = [f"{kind}-{i}" for i, (kind, _, _) in enumerate(DRILL)]
    toks = tokens.add_many(names)
    ids = [tokens.client_id(n) for n in names]
    data = {cid: tiny_data(20 + i, n=30) for i, cid in enumerate(ids)}
    errors: list[BaseException] = []

    def client(i: int) -> None:
        kind, opts, start = DRILL[i]
        attack = client_attack(kind, {**opts, "start_round": start}, cohort_size=COHORT, num_classes=CLASSES, seed=7) if kind != "none" else None
        try:
            run_client(transport.address, toks[names[i]], learner, data[ids[i]], name=names[i], backoff=Backoff(0.05, 0.5),
                       give_up_after_s=20, attack=attack)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(len(DRILL))]
    for th in threads:
        th.start()
    try:
        assert sorted(transport.wait_available(len(ids), timeout_s=10)) == sorted(ids)
        params = learner.init_params(0)
        g = torch.Generator().manual_seed(1)
        for rnd in (1, 2):
            task = make_task(rnd, rnd - 1, params, deadline_s=10.0)
            got = {r.message.client_id: r.message for r in transport.dispatch(task, ids)}
            assert sorted(got) == sorted(ids) and all(isinstance(u, Update) for u in got.values())
            for i, cid in enumerate(ids):
                kind, opts, start = DRILL[i]
                sent = parse_chain("none").decode(got[cid].payload)
                # The simulation's part: this client malicious, collude = false, in a dispatch of COHORT
                # updates (the others honest rows of any value): its row is what the client must send.
                sim = Attack(kind if kind != "none" else "sign_flip", [cid] if kind != "none" else [], collude=False,
                             start_round=start, num_classes=CLASSES, seed=7, **opts)
                own = sim.poison_data(cid, data[cid], rnd)
                honest = learner.fit(params, own, task.spec.fit, client_seed(7, rnd, cid)).delta
                rows = torch.cat([honest[None], torch.randn(COHORT - 1, honest.numel(), generator=g)])
                expect = sim.apply([cid, *range(1000, 1000 + COHORT - 1)], rows, rnd)[0]
                assert torch.equal(sent, expect), (kind, rnd)
                attacking = kind != "none" and rnd >= start
                assert torch.equal(sent, honest) != attacking or kind == "label_flip", (kind, rnd)
                if kind == "label_flip" and attacking:  # trained on flipped labels, so not the honest update
                    assert not torch.equal(sent, learner.fit(params, data[cid], task.spec.fit, client_seed(7, rnd, cid)).delta)
                if kind == "model_replacement" and attacking:
                    assert torch.equal(sent, (-float(COHORT) * honest.double()).float())  # boosted by the assumed cohort
            params = params + torch.stack([parse_chain("none").decode(u.payload) for u in got.values()]).mean(0)
        transport.finish()
        for th in threads:
            th.join(10)
        assert not errors, errors
        assert transport.refusals_total() == {}
    finally:
        transport.finish()


def _run_toml(tmp_path) -> str:
    cfg = load_config({"data": {"dataset": "digits", "clients": 4}, "server": {"cohort": 4}, "model": {"hidden": [8]}})
    path = tmp_path / "run.toml"
    path.write_text(cfg.to_toml())
    return str(path)


@pytest.mark.parametrize("args, says", [
    (["--attack", "alie"], "--attack alie without --attack-alie-z is the colluding attack: its z_max(n, f) needs the number f of attackers"),
    (["--attack", "scaling", "--attack-scale", "-1"], "--attack-scale = -1.0: Input should be greater than 0"),
    (["--attack", "gaussian", "--attack-noise-std", "nan"], "--attack-noise-std = nan: must be a finite number"),
    (["--attack", "sign_flip", "--attack-scale", "2"], "--attack-scale applies to --attack scaling, not --attack sign_flip"),
    (["--attack-value", "3"], "--attack-value needs --attack KIND"),
    (["--attack", "backdoor"], "--attack 'backdoor': unknown attack; a red-team client runs: sign_flip, scaling, gaussian, label_flip"),
])
def test_the_cli_refuses_a_colluding_attack_and_bad_options_in_one_line(tmp_path, capsys, args, says):
    from fleetlearn.cli import main

    # Refused before the server is dialled (nothing listens on port 9).
    assert main(["client", "--server", "127.0.0.1:9", "--token", "t", "--config", _run_toml(tmp_path), "--client-index", "0",
                 "--give-up-after", "1", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fleetlearn: error: " + says) and err.count("\n") == 1, err


@pytest.mark.parametrize("options, says", [({"collude": True}, "collude = true: colluding attackers pool their honest updates"),
                                            ({"fraction": 0.2}, "fraction: the simulation's share of malicious clients")])
def test_a_red_team_client_never_colludes(options, says):
    with pytest.raises(ValueError, match=says):
        client_attack("sign_flip", options, cohort_size=COHORT, num_classes=CLASSES, seed=0)
    assert client_attack("sign_flip", {"collude": False}, cohort_size=COHORT, num_classes=CLASSES, seed=0).collude is False


def test_the_server_refuses_attack_and_points_to_red_team_clients(tmp_path):
    cfg = load_config({"data": {"dataset": "digits", "clients": 4}, "server": {"cohort": 4}, "model": {"hidden": [8]},
                       "attack": {"kind": "sign_flip", "fraction": 0.5}})
    with pytest.raises(ConfigError, match=r"attack\.kind = 'sign_flip': the 'grpc' transport does not carry it; .*a real server "
                                          r"controls no client.*`fleetlearn client --attack KIND`.*attack_simulation"):
        build_coordinator(cfg, store=False, transport_factory=lambda learner, device: commands.server_transport(
            cfg, learner.spec, "127.0.0.1:0", tmp_path / "state"))


# -- a drill on a whole run: 2 of 6 real clients attack --------------------------------------------
ROUNDS = 5
ATTACKERS = (1, 2)  # client ids (token ids start at 1: client i has id i + 1 and trains slot i + 1)


def _drill_cfg(aggregator: str):
    # 7 partition slots; the simulation excludes slot 0, so both train the same slots under the same ids.
    return load_config({"seed": 3, "data": {"dataset": "digits", "clients": 7, "partition": "iid"}, "model": {"hidden": [16]},
                        "client": {"local_epochs": 2, "batch_size": 16},
                        "server": {"rounds": ROUNDS, "cohort": 6, "deadline_s": 60.0, "aggregator": aggregator},
                        "monitoring": {"detectors": []}})


def _grpc(tmp_path, aggregator: str, attack: bool) -> float:
    opts = {i: {"client_index": i + 1, **({"attack": "scaling", "attack_options": {"scale": 10.0}} if i + 1 in ATTACKERS and attack else {})}
            for i in range(6)}
    net = NetworkRun(_drill_cfg(aggregator), tmp_path / f"{aggregator}-{attack}", clients=6, client_options=opts)
    summary = net.run()
    assert [r.accepted for r in summary.records] == [6] * ROUNDS
    return summary.final_accuracy


def _simulation(aggregator: str, attack: bool) -> float:
    cfg = _drill_cfg(aggregator)
    sim = build_coordinator(cfg, store=False)
    sim.excluded_clients = {0}
    if attack:  # the simulation's part, attackers = the red-team clients, each on its own update
        sim.transport.attack = Attack("scaling", list(ATTACKERS), collude=False, scale=10.0, seed=cfg.seed)
    return sim.run().final_accuracy


@pytest.mark.slow
def test_two_red_team_clients_break_the_mean_but_not_the_median_as_in_the_simulation(tmp_path):
    got = {(agg, attack): _grpc(tmp_path, agg, attack) for agg, attack in (("mean", False), ("mean", True), ("median", True))}
    clean = got["mean", False]
    assert clean > 0.8
    assert got["mean", True] < clean - 0.3  # plain mean is broken by 2 scaling attackers in 6
    assert got["median", True] > clean - 0.05  # the median shrugs them off
    # The simulation, with the same two clients attacking, draws the same conclusion with the same numbers.
    for key, acc in got.items():
        ref = _simulation(*key)
        assert abs(acc - ref) <= 0.002, (key, acc, ref)
