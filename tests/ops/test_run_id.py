"""A run named in advance (`store.run_id`, `fleetlearn server --run-id NAME`): a leader and its
standbys start, and restart, with one command."""

from __future__ import annotations

import argparse

import pytest
from rich.console import Console

import fleetlearn
from fleetlearn.cli import _join_named_run
from fleetlearn.ops import RunStore

CFG = {"data": {"clients": 4}, "server": {"rounds": 1, "cohort": 2}}


def test_store_run_id_names_the_new_run_and_a_second_start_is_refused(tmp_path):
    cfg = {**CFG, "store": {"root": str(tmp_path), "run_id": "fleet-1"}}
    s = fleetlearn.run(cfg)
    assert s.run_id == "fleet-1" and (tmp_path / "fleet-1" / "config.toml").is_file()
    with pytest.raises(fleetlearn.FleetlearnError, match="fleet-1"):
        fleetlearn.run(cfg)
    for bad in ("a/b", "../x", "", "-x", "x" * 65):
        with pytest.raises(fleetlearn.ConfigError, match="store.run_id"):
            fleetlearn.run({**CFG, "store": {"root": str(tmp_path), "run_id": bad}})


def _args(tmp_path, standby=False) -> argparse.Namespace:
    config = tmp_path / "run.toml"
    config.write_text('[data]\nclients = 4\n[server]\nrounds = 1\ncohort = 2\n')
    return argparse.Namespace(config=str(config), run_id="fleet-1", runs_dir=str(tmp_path / "runs"), set=None, store=None,
                              standby=standby, resume=None, listen="127.0.0.1:7777", lease_ttl=10.0)


def test_a_server_whose_named_run_exists_resumes_it_and_stands_by_while_another_leads(tmp_path):
    quiet = Console(file=open(tmp_path / "console.txt", "w"))
    args = _args(tmp_path)
    _join_named_run(args, quiet)  # no run yet: it will be started under the name
    assert args.resume is None and args.run_id == "fleet-1" and not args.standby

    fleetlearn.run({**CFG, "store": {"root": str(tmp_path / "runs"), "run_id": "fleet-1"}})
    args = _args(tmp_path)
    _join_named_run(args, quiet)  # it exists, nobody leads it: resume it and lead
    assert args.resume == str(tmp_path / "runs" / "fleet-1") and args.run_id is None and not args.standby

    store = RunStore.open(tmp_path / "runs" / "fleet-1")
    assert store.acquire_lease("other-host:7777", 60.0) is not None  # another server leads it now
    args = _args(tmp_path)
    _join_named_run(args, quiet)
    assert args.resume == str(tmp_path / "runs" / "fleet-1") and args.standby  # a restarted old leader stands by
    assert "is led by 'other-host:7777': standing by" in (tmp_path / "console.txt").read_text()
    store.close()
