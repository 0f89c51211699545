"""Canary and shadow rollouts over gRPC: `fleetlearn server` splits its clients by the
simulation's rule (engine.canary.split_clients over the token ids), runs both arms over
the one transport, decides with the simulation's code, and records the decision in the
run's SQLite registry; a rollback gives production the canary's clients back."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fleetlearn.cli import main
from fleetlearn.config import load_config
from fleetlearn.engine.canary import split_clients
from fleetlearn.ops import ModelRegistry, RunStore
from fleetlearn.transport.grpc import TokenStore, commands

FLEET = Path(__file__).with_name("grpc_fleet_process.py")
CLIENTS = 4

CONFIG = """
seed = 3
[data]
dataset = "digits"
clients = 4
partition = "iid"
[model]
hidden = [16]
[client]
local_epochs = 1
batch_size = 16
lr = {lr}
[server]
rounds = 4
cohort = 4
[monitoring]
detectors = []
[canary]
set = ["client.lr={candidate_lr}"]
mode = "{mode}"
fraction = 0.5
start_round = 2
rounds = 2
window = 2
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(tmp: Path, lr: float, candidate_lr: float, mode: str = "canary"):
    """`fleetlearn server` (in this process, TLS, tokens) and a client process with 4 real
    clients; returns (the run's store, the clients' reports, the token ids by slot)."""
    tmp.mkdir()
    cfg = tmp / "run.toml"
    cfg.write_text(CONFIG.format(lr=lr, candidate_lr=candidate_lr, mode=mode))
    commands.certs(tmp / "certs")
    toks = {i: commands.token_add(tmp / "state", f"site-{i}") for i in range(CLIENTS)}
    with TokenStore.open(tmp / "state") as ts:
        ids = {i: ts.client_id(f"site-{i}") for i in range(CLIENTS)}
    port = free_port()
    fleet = subprocess.Popen([sys.executable, str(FLEET), f"127.0.0.1:{port}", str(cfg), str(tmp / "certs" / "ca.pem"),
                              *(f"{i}:{t}" for i, t in toks.items())], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp)
    try:
        code = main(["server", str(cfg), "--listen", f"127.0.0.1:{port}", "--state", str(tmp / "state"), "--certs", str(tmp / "certs"),
                     "--min-clients", str(CLIENTS), "--wait-s", "120", "--runs-dir", str(tmp / "runs"), "--json"])
        out, err = fleet.communicate(timeout=120)
    finally:
        if fleet.poll() is None:
            fleet.kill()
    assert code == 0 and fleet.returncode == 0, err[-3000:]
    reports = {int(k): v for k, v in json.loads(out.strip().splitlines()[-1]).items()}
    assert {i: r["stopped"] for i, r in reports.items()} == {i: "finished" for i in range(CLIENTS)}
    (run_dir,) = (tmp / "runs").iterdir()
    return RunStore.open(run_dir), reports, ids


def _canary(records):
    by_round = {r.round: r.extra["canary"] for r in records if "canary" in r.extra}
    decision = [c["decision"] for c in by_round.values() if "decision" in c]
    assert len(decision) == 1
    return by_round, decision[0]


def _tasks(reports) -> dict[int, dict[int, tuple[int, float]]]:
    """{client id: {round: (model version, lr)}} of the tasks each client's device trained."""
    return {r["client_id"]: {rnd: (v, lr) for rnd, v, lr in r["tasks"]} for r in reports.values()}


def _clients(record) -> dict[int, str]:
    return {c.client_id: c.status for c in record.clients}


@pytest.mark.slow
def test_a_worse_canary_is_rolled_back_and_a_better_one_promoted_over_grpc(tmp_path, capsys):
    # Worse: the candidate's client lr is production's x 10 (0.05 -> 0.5 with momentum 0.9 overshoots).
    store, reports, ids = _serve(tmp_path / "worse", 0.05, 0.5)
    records = store.records()
    by_round, d = _canary(records)
    assert d["decision"] == "rollback" and d["round"] == 3 and d["rounds"] == 2 and d["candidate"] < d["production"]
    assert "canary: rollback after round 3" in capsys.readouterr().err
    # The split is the simulation's rule over the token ids: 2 and 2, disjoint.
    prod_ids, cand_ids = (set(map(int, a)) for a in split_clients(sorted(ids.values()), 0.5, seed=3))
    assert len(cand_ids) == 2 and prod_ids | cand_ids == set(ids.values())
    for r in (2, 3):  # canary rounds: each arm trained its own clients only
        assert set(_clients(records[r - 1])) == prod_ids and set(by_round[r]["candidate_cohort"]) == cand_ids
        assert by_round[r]["candidate_status"] == "ok"
    # The decision is in the run's SQLite registry: the candidate's versions, tagged rolled back.
    reg = ModelRegistry(RunStore.open(store.run_dir))
    vs = {v.version: v for v in reg.versions()}
    cand = [v for v in vs.values() if v.arm == "canary"]
    assert sorted(v.version for v in cand) == d["candidate_versions"] and len(cand) == 2
    assert all(set(v.tags) == {"canary", "rolled_back"} for v in cand)
    kept = load_config(store.run_dir / "canary" / f"{cand[0].config_hash}.toml")
    assert kept.client.lr == 0.5 and cand[0].config_hash == d["candidate_config_hash"] != store.info()["config_hash"]
    assert reg.production() is None
    # After the rollback the canary's clients train production's tasks: round 4 is production's,
    # from a production version, with all 4 clients accepted (the clients saw it accepted too).
    last = records[-1]
    assert last.round == 4 and "canary" not in last.extra and _clients(last) == {i: "accepted" for i in ids.values()}
    assert last.parent_version == records[-2].version and not set(reg.lineage(last.version)) & {v.version for v in cand}
    assert vs[last.version].arm == "production" and vs[last.version].config_hash == store.info()["config_hash"]
    assert all(r["rounds"] == [1, 2, 3, 4] for r in reports.values())
    # What the clients' devices trained: each arm its own model and lr in rounds 2-3; round 4 production's for all.
    tasks = _tasks(reports)
    for c in ids.values():
        arm_lr = 0.5 if c in cand_ids else 0.05
        assert {rnd: lr for rnd, (_, lr) in tasks[c].items()} == {1: 0.05, 2: arm_lr, 3: arm_lr, 4: 0.05}
        assert tasks[c][3][0] == (d["candidate_versions"][0] if c in cand_ids else records[1].version)
        assert tasks[c][4][0] == records[2].version == last.parent_version
    assert not any(sum((r.extra.get("refusals") or {}).values()) for r in records)  # both arms' round 2 and 3: nothing refused
    assert json.loads((store.run_dir / "canary.json").read_text())[0]["decision"] == "rollback"
    # Resuming a canary run stays refused, as in the simulation.
    assert main(["server", "--resume", store.run_id, "--runs-dir", str(tmp_path / "worse" / "runs"), "--state", str(tmp_path / "worse" / "state")]) == 2
    assert "canary rollout; resuming one is not supported" in capsys.readouterr().err

    # Better: production's client lr is too small; the candidate's (x 10) learns faster.
    store, reports, ids = _serve(tmp_path / "better", 0.003, 0.03)
    records = store.records()
    _, d = _canary(records)
    assert d["decision"] == "promote" and d["round"] == 3 and d["candidate"] > d["production"]
    reg = ModelRegistry(RunStore.open(store.run_dir))
    vs = {v.version: v for v in reg.versions()}
    promoted = d["candidate_versions"][-1]
    assert reg.production() == promoted and {"canary", "production"} <= set(vs[promoted].tags)
    # After the promotion the candidate is production: its model, its config, every client.
    last = records[-1]
    assert last.parent_version == promoted and vs[last.version].config_hash == d["candidate_config_hash"]
    assert _clients(last) == {i: "accepted" for i in ids.values()}
    assert all(r["rounds"] == [1, 2, 3, 4] for r in reports.values())
    assert all(t[4] == (promoted, 0.03) for t in _tasks(reports).values())  # every client trains the candidate's task


@pytest.mark.slow
def test_a_shadow_over_grpc_records_its_verdict_and_never_ships(tmp_path):
    store, reports, ids = _serve(tmp_path / "shadow", 0.003, 0.03, mode="shadow")
    records = store.records()
    by_round, d = _canary(records)
    assert d["mode"] == "shadow" and d["decision"] in ("shadow_pass", "shadow_fail") and d["round"] == 3
    assert all(set(by_round[r]["candidate_cohort"]) | set(_clients(records[r - 1])) == set(ids.values()) for r in (2, 3))
    reg = ModelRegistry(RunStore.open(store.run_dir))
    vs = {v.version: v for v in reg.versions()}
    shadow = [v for v in vs.values() if v.arm == "shadow"]
    assert sorted(v.version for v in shadow) == d["candidate_versions"] and all("candidate" in v.tags for v in shadow)
    assert reg.production() is None  # never shipped: production's config trains every later round
    prod_hash = store.info()["config_hash"]
    assert all(vs[r.version].config_hash == prod_hash for r in records) and not set(reg.lineage(records[-1].version)) & set(d["candidate_versions"])
    assert _clients(records[-1]) == {i: "accepted" for i in ids.values()}
    assert all(r["rounds"] == [1, 2, 3, 4] for r in reports.values())
    cand_ids = set(by_round[2]["candidate_cohort"])
    for c, t in _tasks(reports).items():  # the shadow's clients trained its lr, then production's
        arm_lr = 0.03 if c in cand_ids else 0.003
        assert {rnd: lr for rnd, (_, lr) in t.items()} == {1: 0.003, 2: arm_lr, 3: arm_lr, 4: 0.003}


@pytest.mark.parametrize("override,key", [
    ("compression.uplink='q8'", "compression.uplink"),
    ("client.objective='scaffold'", "client.objective"),
    ("compression.adaptive=true", "compression.adaptive"),
])
def test_a_canary_that_changes_what_clients_registered_for_is_refused(tmp_path, capsys, override, key):
    cfg = tmp_path / "run.toml"
    cfg.write_text(CONFIG.format(lr=0.05, candidate_lr=0.5, mode="canary"))
    code = main(["server", str(cfg), "--listen", f"127.0.0.1:{free_port()}", "--state", str(tmp_path / "state"),
                 "--runs-dir", str(tmp_path / "runs"), "--set", f'canary.set=["{override}"]'])
    err = capsys.readouterr().err
    assert code == 2
    assert "canary.set = " in err and override in err and f"agreed to {key}" in err and "when they registered" in err, err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no run was created


def test_a_canary_with_a_task_only_change_is_accepted_by_the_check():
    cfg = load_config({"canary": {"set": ["client.lr=0.5", "client.local_epochs=3", "server.aggregator='median'"]}})
    commands.check_canary(cfg)  # nothing a client agreed to at registration changes


def test_the_split_over_token_ids_is_the_simulations_rule():
    import numpy as np

    from fleetlearn.engine.canary import split_population

    ids = np.array([3, 7, 8, 12, 20, 21, 40, 41, 42, 99])  # token ids: not 0..N-1, with gaps
    prod, cand = split_clients(ids[::-1], 0.3, seed=5)  # order given does not matter
    p0, c0 = split_population(len(ids), 0.3, seed=5)
    assert list(cand) == list(ids[c0]) and list(prod) == list(ids[p0]) and len(cand) == 3
    assert list(split_clients([4], 0.5, seed=0)[1]) == []  # one client: nobody for the candidate


def test_a_late_update_of_the_first_arm_of_a_round_is_refused_as_after_deadline(transport, tokens, learner):
    """Both arms dispatch round 1 in turn: the canary client that missed its arm's deadline
    is refused with that reason while production's round 1 is open, and after it."""
    import grpc
    from grpc_raw_client import RawClient
    from grpc_test_support import DispatchThread, make_task

    from fleetlearn.compression import parse_chain
    from fleetlearn.messages import Dropout, Update

    toks = tokens.add_many(["canary", "prod"])
    late, prod = (RawClient(transport.address, toks[n]) for n in ("canary", "prod"))
    for c in (late, prod):
        c.register(learner.spec.digest())
        c.start_heartbeats(0.05)
    transport.wait_available(2, timeout_s=10)
    params = learner.init_params(0)
    payload = parse_chain("none").encode(params)[0]
    (drop,) = list(transport.dispatch(make_task(1, 0, params, deadline_s=0.5), [late.client_id]))  # the candidate's arm
    assert isinstance(drop.message, Dropout) and "deadline" in drop.message.reason
    d = DispatchThread(transport, make_task(1, 0, params, deadline_s=10.0), [prod.client_id])  # production's arm, same round
    meta, _, _ = prod.pull()
    assert meta.round == 1
    with pytest.raises(grpc.RpcError) as err:
        late.push(1, 0, payload)
    assert "deadline" in err.value.details()
    prod.push(1, 0, payload)
    (reply,) = d.join()
    assert isinstance(reply.message, Update) and reply.message.client_id == prod.client_id
    list(transport.dispatch(make_task(2, 1, params, deadline_s=0.5), []))
    with pytest.raises(grpc.RpcError) as err:
        late.push(1, 0, payload)
    assert "deadline" in err.value.details()
    assert transport.refusals_total() == {"after_deadline": 2}
    for c in (late, prod):
        c.close()
