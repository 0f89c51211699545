"""Acceptance: a fault injected from round 10 (30% of the population turn into
scaling attackers under a plain mean) is detected and rolled back automatically,
the run ends within 2 pp of the same run without the fault, `fleetlearn report`
shows the rollbacks, and `fleetlearn models ...` works on the real run store."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

import fleetlearn
from fleetlearn.attacks import malicious_clients
from fleetlearn.ops import ModelRegistry, RunStore

FAULT_ROUND = 10
CONFIG = {
    "seed": 0,
    "data": {"clients": 60, "alpha": 1.0},
    "server": {"rounds": 30, "cohort": 20},
    "client": {"local_epochs": 5},
    "monitoring": {
        "guardrail": ["divergence", "outlier_updates", "drift"],
        "guardrail_exclude_rounds": 100,  # flagged clients stay out for the rest of the run
        # Automatic rollback acts on every odd update (info and above), not only on what a
        # person is warned about: a rolled-back round costs one round, a shipped attack more.
        "guardrail_min_severity": "info",
        "drift_threshold": 0.15,
    },
}
FAULT = {"kind": "scaling", "fraction": 0.3, "start_round": FAULT_ROUND, "scale": 10.0, "collude": False}


def fl(*args, cwd):
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "fleetlearn", *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    clean = fleetlearn.run({**CONFIG, "store": {"root": str(root)}})
    faulty = fleetlearn.run({**CONFIG, "attack": FAULT, "store": {"root": str(root)}})
    return root, clean, faulty


@pytest.mark.slow
def test_an_injected_fault_is_rolled_back_within_3_rounds_and_the_run_recovers(runs):
    root, clean, faulty = runs
    recs = {r.round: r for r in faulty.records}
    # Identical before the fault: the fault is the only difference.
    assert [recs[r].status for r in range(1, FAULT_ROUND)] == [r.status for r in clean.records[: FAULT_ROUND - 1]]
    rollbacks = [r for r in range(FAULT_ROUND, 31) if recs[r].status == "rolled_back"]
    assert rollbacks and rollbacks[0] <= FAULT_ROUND + 2, "the fault was not rolled back within 3 rounds"
    # No round that aggregated an attacker's update shipped: every such round was rolled back.
    attacked = [r for r in range(FAULT_ROUND, 31) if recs[r].extra.get("malicious")]
    assert attacked and all(recs[r].status == "rolled_back" for r in attacked), [(r, recs[r].status) for r in attacked]
    # The flagged clients were excluded, and they are attackers.
    excluded = {c for r in rollbacks for c in (recs[r].extra.get("guardrail") or {}).get("excluded_now", [])}
    bad = set(malicious_clients(60, FAULT["fraction"], 0).tolist())
    assert len(excluded & bad) >= 10
    assert abs(faulty.final_accuracy - clean.final_accuracy) <= 0.02, (faulty.final_accuracy, clean.final_accuracy)

    # The registry tagged every rejected version rolled_back, with the detector as the reason.
    reg = ModelRegistry(RunStore.open(faulty.run_dir))
    rolled = {v.version: v for v in reg.versions() if v.status == "rolled_back"}
    assert {recs[r].extra["rejected_version"] for r in rollbacks} <= set(rolled)
    assert all(v.tags == ["rolled_back"] for v in rolled.values())
    first = rolled[recs[rollbacks[0]].extra["rejected_version"]]
    assert first.round == rollbacks[0] and "guardrail" in [h for h in reg.tag_history() if h["version"] == first.version][0]["reason"]

    # The report shows the rollbacks: its Rollbacks table lists the round, and the plots exist.
    p = fl("report", faulty.run_dir, cwd=root)
    assert p.returncode == 0, p.stderr
    page = (RunStore.open(faulty.run_dir).run_dir / "report" / "report.html").read_text()
    table = page.split("<h2>Rollbacks</h2>", 1)[1].split("</table>", 1)[0]
    assert f"<tr><td>{rollbacks[0]}</td>" in table and "guardrail" in table
    assert len(re.findall(r"<tr><td>\d+</td>", table)) == len([r for r in faulty.records if r.status == "rolled_back"])


def cli(capsys, *args):
    """The `fleetlearn` command in-process (each subprocess would pay torch's import): (exit code, stdout, stderr)."""
    from fleetlearn.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.slow
def test_models_commands_end_to_end_on_the_run_store(runs, tmp_path, capsys):
    from safetensors import safe_open

    from fleetlearn.learners import model_factory
    from fleetlearn.params import ParamSpec

    root, _, faulty = runs
    run, rd = faulty.run_id, ("--runs-dir", root)
    code, out, _ = cli(capsys, "models", "list", run, "--json", *rd)
    versions = {v["version"]: v for v in json.loads(out)}
    committed = sorted(v for v, x in versions.items() if x["status"] == "committed")
    assert code == 0 and any("rolled_back" in x["tags"] for x in versions.values())
    assert all(versions[v]["parent_version"] in versions or versions[v]["parent_version"] == 0 for v in committed)
    p = fl("models", "list", run, "--runs-dir", str(root), cwd=tmp_path)  # the real command, as a user runs it
    assert p.returncode == 0 and "rolled_back" in p.stdout and str(committed[-1]) in p.stdout

    a, b = committed[-2], committed[-1]
    for v in (a, b):
        code, out, _ = cli(capsys, "models", "promote", run, v, *rd)
        assert code == 0 and f"version {v} is production" in out
    listed = {v["version"]: v["tags"] for v in json.loads(cli(capsys, "models", "list", run, "--json", *rd)[1])}
    assert [v for v, t in listed.items() if "production" in t] == [b]

    code, out, _ = cli(capsys, "models", "rollback", run, *rd)
    assert code == 0 and f"version {b} rolled back; version {a} is production" in out
    shown = json.loads(cli(capsys, "models", "show", run, b, "--json", *rd)[1])
    assert shown["tags"] == ["rolled_back"] and shown["lineage"][:2] == [b, shown["parent_version"]]

    out_file = tmp_path / "model.safetensors"
    code, _, err = cli(capsys, "models", "export", run, "--out", out_file, *rd)  # default: the production version
    assert code == 0, err
    with safe_open(str(out_file), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["version"] == str(a) and "production" in json.loads(meta["tags"])
    module = model_factory("mlp", 64, 10, [128], {})()
    module.load_state_dict(tensors, strict=True)  # loadable into the run's architecture
    _, params, _ = RunStore.open(faulty.run_dir).load_checkpoint(a)
    assert torch.equal(ParamSpec.from_module(module).flatten(dict(module.named_parameters())), params)

    for args, needle in [
        (("models", "promote", run, *rd), "needs a VERSION"),
        (("models", "promote", run, "abc", *rd), "VERSION must be an integer"),
        (("models", "show", run, "999", *rd), "no model version 999"),
        (("models", "export", run, *rd), "needs --out"),
        (("models", "list", "no-such-run", *rd), "no run found"),
    ]:
        code, _, err = cli(capsys, *args)
        assert code == 2 and err.startswith("fleetlearn: error:") and needle in err and len(err.strip().splitlines()) == 1
    p = fl("models", "promote", run, "999", "--runs-dir", str(root), cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.startswith("fleetlearn: error:") and "Traceback" not in p.stderr
    with pytest.raises(SystemExit) as help_exit:
        cli(capsys, "models", "--help")
    assert help_exit.value.code == 0
