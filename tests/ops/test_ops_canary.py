"""Canary rollouts and gradual onboarding, on real small runs."""

import json
import math

import numpy as np
import pytest

import fleetlearn
from fleetlearn.config import ConfigError, load_config
from fleetlearn.monitoring.series import events
from fleetlearn.engine.canary import candidate_config, split_population
from fleetlearn.ops import ModelRegistry, RunStore
from fleetlearn.selection import NewcomerCap, RandomSelector, RestrictedSelector


def _canary_config(root, lr, candidate, mode="canary", rounds=10, canary_rounds=5):
    return {
        "seed": 0, "data": {"clients": 40, "alpha": 1.0}, "server": {"rounds": rounds, "cohort": 10},
        "client": {"local_epochs": 2, "lr": lr}, "store": {"root": str(root)},
        "canary": {"set": candidate, "mode": mode, "fraction": 0.5, "start_round": 3, "rounds": canary_rounds, "window": min(3, canary_rounds)},
    }


def _decision(summary):
    found = [r.extra["canary"]["decision"] for r in summary.records if "decision" in (r.extra.get("canary") or {})]
    assert len(found) == 1
    return found[0]


@pytest.mark.slow
def test_a_worse_candidate_is_rolled_back_and_a_better_one_promoted(tmp_path):
    # Worse: production's client lr x 10 (0.1 -> 1.0 with momentum 0.9 overshoots).
    worse = fleetlearn.run(_canary_config(tmp_path, 0.1, ["client.lr=1.0"]))
    d = _decision(worse)
    assert d["decision"] == "rollback" and d["round"] == 7 and d["rounds"] == 5
    assert d["candidate"] < d["production"] and "candidate accuracy" in d["reason"]
    # During the canary the cohort was split; after the rollback production has it all again.
    assert [r.selected for r in worse.records] == [10, 10, 5, 5, 5, 5, 5, 10, 10, 10]
    store = RunStore.open(worse.run_dir)
    reg = ModelRegistry(store)
    vs = {v.version: v for v in reg.versions()}
    cand = [v for v in vs.values() if v.arm == "canary"]
    assert [v.version for v in cand] == d["candidate_versions"] and len(cand) == 5
    assert all(set(v.tags) == {"canary", "rolled_back"} for v in cand)
    assert all(v.config_hash != store.info()["config_hash"] for v in cand)
    kept = load_config(store.run_dir / "canary" / f"{cand[0].config_hash}.toml")
    assert kept.client.lr == 1.0 and kept.canary.set == [] and kept.digest() == cand[0].config_hash
    # Production's lineage never goes through a candidate version.
    final = worse.records[-1].version
    assert not set(reg.lineage(final)) & {v.version for v in cand}
    assert json.loads((store.run_dir / "canary.json").read_text())[0]["decision"] == "rollback"
    # What the report and dashboard show (their `events`) has the decision.
    assert [e["decision"] for e in events(store.records())["canary"]] == ["rollback"]

    # Better: production's client lr is too small; the candidate's (x 10) learns faster.
    better = fleetlearn.run(_canary_config(tmp_path, 0.005, ["client.lr=0.05"]))
    d = _decision(better)
    assert d["decision"] == "promote" and d["candidate"] > d["production"]
    store = RunStore.open(better.run_dir)
    reg = ModelRegistry(store)
    vs = {v.version: v for v in reg.versions()}
    promoted = d["candidate_versions"][-1]
    assert reg.production() == promoted and "canary" in vs[promoted].tags
    # After the promotion the run continues from the candidate's model, with its configuration.
    after = [r for r in better.records if r.round > d["round"]]
    assert after[0].parent_version == promoted and promoted in reg.lineage(better.records[-1].version)
    assert {vs[r.version].config_hash for r in after} == {d["candidate_config_hash"]}
    assert all(r.selected == 10 for r in after)
    assert better.final_accuracy > worse.final_accuracy - 0.2  # sanity: the promoted run trained
    assert json.loads((store.run_dir / "canary.json").read_text())[0]["decision"] == "promote"


def test_shadow_mode_records_the_decision_but_never_ships(tmp_path):
    s = fleetlearn.run(_canary_config(tmp_path, 0.005, ["client.lr=0.05"], mode="shadow", rounds=5, canary_rounds=2))
    d = _decision(s)
    assert d["mode"] == "shadow" and d["decision"] in ("shadow_pass", "shadow_fail") and d["round"] == 4
    store = RunStore.open(s.run_dir)
    reg = ModelRegistry(store)
    vs = {v.version: v for v in reg.versions()}
    shadow = [v for v in vs.values() if v.arm == "shadow"]
    assert [v.version for v in shadow] == d["candidate_versions"] and all("candidate" in v.tags for v in shadow)
    assert reg.production() is None
    prod_hash = store.info()["config_hash"]
    assert all(vs[r.version].config_hash == prod_hash for r in s.records if r.status == "ok")
    assert not set(reg.lineage(s.records[-1].version)) & {v.version for v in shadow}


def test_candidate_configuration_and_population_split():
    cfg = load_config({"data": {"clients": 30}, "server": {"cohort": 10}, "canary": {"set": ["client.lr=0.5", "compression.uplink='q8'"]}})
    cand = candidate_config(cfg)
    assert cand.client.lr == 0.5 and cand.compression.uplink == "q8" and cand.canary.set == [] and cfg.client.lr == 0.05
    prod, cnd = split_population(30, 0.2, seed=3)
    assert len(cnd) == 6 and not set(prod) & set(cnd) and sorted(set(prod) | set(cnd)) == list(range(30))
    assert np.array_equal(split_population(30, 0.2, seed=3)[1], cnd)


@pytest.mark.parametrize("canary,needle", [
    ({"set": ["data.alpha=1.0"]}, "canary.set"),
    ({"set": ["client.lr=0.5"], "window": 9, "rounds": 3}, "canary.window = 9 exceeds canary.rounds = 3"),
    ({"set": ["client.lr=-1"]}, "client.lr"),
    ({"set": ["client.lr=0.5"], "mode": "blue"}, "canary.mode"),
])
def test_bad_canary_settings_name_the_key(canary, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
        cfg = load_config({"canary": canary})
        candidate_config(cfg)


def test_restricted_selector_and_newcomer_cap():
    rng = np.random.default_rng(0)
    r = RestrictedSelector(RandomSelector(), allowed=[1, 3, 5, 7])
    assert set(r.select(range(10), 3, 1, rng)) <= {1, 3, 5, 7}
    assert sorted(r.select(range(10), 8, 1, rng)) == [1, 3, 5, 7]  # no more than the arm has

    cap = NewcomerCap(RandomSelector(), max_newcomers=3, population=20)
    seen: set[int] = set()
    for rnd in range(1, 15):
        cohort = cap.select(range(20), 8, rnd, rng)
        new = set(cohort) - seen
        assert len(new) <= 3 and len(cohort) == min(8, len(seen) + 3)
        seen |= set(cohort)
    assert len(seen) >= 18  # everyone gets onboarded, three at a time at most


def test_max_newcomers_in_a_run_is_recorded_per_round():
    s = fleetlearn.run({"data": {"clients": 20}, "server": {"rounds": 4, "cohort": 6, "max_newcomers": 2}, "client": {"local_epochs": 1}}, store=False)
    newcomers = [r.extra["newcomers"] for r in s.records]
    assert all(n <= 2 for n in newcomers) and [r.selected for r in s.records] == [2, 4, 6, 6]
    distinct = {c.client_id for r in s.records for c in r.clients}
    assert sum(newcomers) == len(distinct)
    assert not math.isnan(s.final_accuracy)
    with pytest.raises(ConfigError, match="server.max_newcomers"):
        load_config({"server": {"max_newcomers": 0}})


def test_fleetlearn_run_drives_a_canary_from_the_command_line(tmp_path, capsys):
    from fleetlearn.cli import main

    code = main(["run", "--quiet", "--json", "--runs-dir", str(tmp_path), "--set", "data.clients=20", "--set", "server.cohort=4",
                 "--set", "server.rounds=3", "--set", "client.local_epochs=1", "--set", 'canary.set=["client.lr=1.0"]',
                 "--set", "canary.rounds=2", "--set", "canary.window=2", "--set", "canary.fraction=0.5"])
    out = capsys.readouterr().out
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    decisions = json.loads((tmp_path / summary["run_id"] / "canary.json").read_text())
    assert len(decisions) == 1 and decisions[0]["round"] == 2 and decisions[0]["overrides"] == ["client.lr=1.0"]
    assert main(["run", "--quiet", "--set", 'canary.set=["data.alpha=1"]']) == 2
    assert "canary.set" in capsys.readouterr().err
