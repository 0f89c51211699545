"""Hardening of config input (items 13-17 and 21 of the Hardening issue): every bad
setting is a refusal naming the key, the value and what is allowed, before anything runs;
every refusal is a fleetlearn.FleetlearnError."""

import json
import math
import os
import socket
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import fleetlearn
from fleetlearn import cli
from fleetlearn import api
from fleetlearn.engine import build_run
from fleetlearn.config import ConfigError, RunConfig, load_config

build = getattr(api, "build", build_run)  # api.build: build_run with every failure to build a ConfigError
HERE = Path(__file__).resolve().parent
SMALL = {"data": {"clients": 10}, "server": {"rounds": 1, "cohort": 5}, "client": {"local_epochs": 1}, "monitoring": {"debug": False}}
B = ["--set", "server.rounds=1", "--set", "data.clients=10", "--set", "server.cohort=5", "--set", "client.local_epochs=1"]


def small(**sections) -> dict:
    out = json.loads(json.dumps(SMALL))
    for name, values in sections.items():
        out.setdefault(name, {}).update(values)
    return out


def refused(data: dict, *needles: str) -> str:
    """The ConfigError message for `data` (load and build, no training); each needle in it."""
    with pytest.raises(ConfigError) as exc:
        build(load_config(data), store=False)
    for n in needles:
        assert n in str(exc.value), str(exc.value)
    return str(exc.value)


@pytest.fixture
def import_here(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


def run_cli(args, tmp_path, capsys, runs_dir=True):
    before = os.getcwd()
    os.chdir(tmp_path)  # a default store.root ("runs") lands in tmp_path
    try:
        rc = cli.main(["run", "--quiet", *(["--runs-dir", str(tmp_path / "runs")] if runs_dir else []), *B, *args])
    finally:
        os.chdir(before)
    out = capsys.readouterr()
    return rc, out.out, out.err


# -- 13: every float is finite ------------------------------------------------------------------
def _float_keys() -> list[tuple[str, bool]]:
    """(key, is a list of floats) for every float key of every section."""
    out = []
    for name, field in RunConfig.model_fields.items():
        section = field.annotation
        if not (isinstance(section, type) and hasattr(section, "model_fields")):
            continue
        for key, sub in section.model_fields.items():
            args = typing.get_args(sub.annotation) or (sub.annotation,)
            if float in args or sub.annotation is float:
                out.append((f"{name}.{key}", typing.get_origin(sub.annotation) is list))
    return out


FLOAT_KEYS = _float_keys()


def test_item13_no_float_key_accepts_inf_or_nan():
    assert len(FLOAT_KEYS) > 80  # every section's float keys, introspected
    accepted = []
    for key, is_list in FLOAT_KEYS:
        for value in ("inf", "-inf", "nan"):
            value = f"[1.0, {value}]" if is_list else value
            try:
                load_config(None, [f"{key}={value}"])
                accepted.append(f"{key}={value}")
            except ConfigError as exc:
                assert key in str(exc) and "finite" in str(exc), str(exc)
    assert accepted == []


@pytest.mark.parametrize("override", ["server.over_selection=inf", "client.lr=inf", "client.weight_decay=inf"])
def test_item13_the_issue_examples_exit_2_naming_the_key(override, tmp_path, capsys):
    rc, _, err = run_cli(["--set", override], tmp_path, capsys)
    assert rc == 2 and override.split("=")[0] in err and "must be a finite number" in err and "Traceback" not in err


# -- 14: settings that fail every round are refused; a run whose rounds all failed is not a success --
@pytest.mark.parametrize("server,needle", [
    ({"aggregator": "krum", "byzantine_f": 4}, "krum needs n > 2f + 2: n = 5, f = 4"),
    ({"aggregator": "bulyan", "byzantine_f": 1}, "bulyan needs n >= 4f + 3: n = 5, f = 1"),
    ({"aggregator": "bulyan", "cohort": 2}, "bulyan needs n >= 4f + 3: n = 2"),
    ({"aggregator": "multi_krum", "krum_m": 9}, "multi_krum needs m <= n: m = 9, n = 5"),
    ({"aggregator": "dnc", "byzantine_f": 100}, "dnc needs n > 2f (an honest majority): n = 5, f = 100"),
])
def test_item14_aggregator_preconditions_refuse_the_config(server, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(small(server=server))
    msg = str(exc.value)
    assert needle in msg and f"server.aggregator = {server['aggregator']!r}" in msg and "every round would fail" in msg


def test_item14_robust_aggregators_with_room_are_accepted():
    load_config(small(server={"aggregator": "krum", "byzantine_f": 1}))
    load_config(small(server={"aggregator": "dnc", "byzantine_f": 2, "reputation": True}))


def test_item14_a_run_whose_every_round_failed_exits_nonzero(tmp_path, capsys):
    rc, out, err = run_cli(["--json", "--set", "devices.dropout=1.0"], tmp_path, capsys)
    assert rc == 1, (out, err)
    assert err.startswith("fleetlearn: error: every round failed (1 of 1)") and "Traceback" not in err
    assert json.loads(out.strip().splitlines()[-1])["failed_rounds"] == 1  # the summary is still printed
    with pytest.raises(fleetlearn.RunFailedError, match="every round failed") as exc:
        fleetlearn.run(small(devices={"dropout": 1.0}), store=False)
    assert exc.value.summary.failed_rounds == exc.value.summary.rounds == 1


# -- 15: errors, not tracebacks ------------------------------------------------------------------
def test_item15_privacy_and_secagg_limits():
    refused(small(privacy={"mode": "central", "noise_multiplier": 1e-9}), "privacy.noise_multiplier = 1e-09", ">= 0.1", "rdp")
    load_config(small(privacy={"mode": "central", "noise_multiplier": 1e-9, "accounting": "rdp"}))  # rdp has no grid
    refused(small(privacy={"secure_aggregation": True, "secagg_threshold": 50}),
            "privacy.secagg_threshold = 50", "exceeds the 4 share holders", "allowed: 2 to 4")


def test_item15_store_root_that_is_not_a_folder(tmp_path, capsys):
    rc, _, err = run_cli(["--set", "store.root=\"/dev/null\""], tmp_path, capsys, runs_dir=False)
    assert rc == 2 and "/dev/null" in err and "Traceback" not in err
    with pytest.raises(ConfigError, match=r"store.root = '/dev/null'"):
        fleetlearn.run(small(store={"root": "/dev/null"}))


def test_item15_prometheus_host_or_port_that_cannot_serve():
    refused(small(monitoring={"prometheus_port": 0, "prometheus_host": "no.such.host.invalid"}),
            "monitoring.prometheus_host = 'no.such.host.invalid'", "allowed:")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        refused(small(monitoring={"prometheus_port": port}), f"monitoring.prometheus_port = {port}", "free port")


def test_item15_deeply_nested_toml(tmp_path):
    p = tmp_path / "deep.toml"
    p.write_text("[model]\nkwargs = { a = " + "[" * 2000 + "]" * 2000 + " }\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(p)
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(None, ["model.kwargs={a = " + "[" * 2000 + "]" * 2000 + "}"])


@pytest.mark.parametrize("factory,needle", [
    ("raises", "building the model raised ValueError: no such architecture"),
    ("exits", "called exit (3)"),
    ("wrong_shape", "expected float32 logits of shape (2, 10)"),
    ("float64", "parameters are torch.float64; expected float32"),
    ("no_parameters", "has no parameters"),
])
def test_item15_model_factories_that_fail_are_named(import_here, factory, needle):
    refused(small(model={"name": f"hardening_models:{factory}"}), f"model.name = 'hardening_models:{factory}'", needle)


def test_item15_a_good_custom_model_still_builds(import_here):
    build(load_config(small(model={"name": "hardening_models:ok"})), store=False)


def test_item15_sizes_that_cannot_fit(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"engine.threads = 1000000.*from 1 to 512"):
        load_config(None, ["engine.threads=1e6"])
    refused(small(model={"hidden": [10**9]}), "model.hidden = [1000000000]", "parameters", "allowed: at most")
    refused(small(distill={"student_hidden": [10**9]}), "distill.student_hidden = [1000000000]", "allowed: at most")
    with pytest.raises(ConfigError, match=r"engine.regions = 1000000000 exceeds the number of clients \(10\); allowed: 1 to 10"):
        load_config(small(engine={"regions": 10**9}))
    with pytest.raises(ConfigError, match=r"server.rounds = 1000000000000000000000000000000: integer out of range"):
        load_config(small(server={"rounds": 10**30}))
    # a batch larger than any client's data is full-batch training, not a (cohort, steps, 1e9) index array
    rc, _, err = run_cli(["--set", "client.batch_size=1e9"], tmp_path, capsys)
    assert rc == 0, err


def test_item15_a_dataset_that_exits_is_an_error(tmp_path, capsys):
    rc, _, err = run_cli(["--set", "data.dataset=\"sys:exit\""], tmp_path, capsys)
    assert rc == 2 and "data.dataset = 'sys:exit'" in err and "called exit" in err


# -- 16: nothing silently accepted ---------------------------------------------------------------
def test_item16_model_kwargs_a_builtin_ignores():
    with pytest.raises(ConfigError, match=r"model.kwargs = \{'embed': 4\}: model.name = 'mlp' takes no kwargs"):
        load_config(small(model={"kwargs": {"embed": 4}}))
    with pytest.raises(ConfigError, match=r"model.hidden = \[32\]: model.name = 'logistic' has no hidden layers"):
        load_config(small(model={"name": "logistic", "hidden": [32]}))


@pytest.mark.parametrize("chain", ["topk:0.1 | q8", "sketch:100", "randk:0.05", "ef | topk:0.1"])
def test_item16_sparsifying_or_sketching_downlinks_are_refused(chain):
    refused(small(compression={"downlink": chain}), f"compression.downlink = {chain!r}", "allowed on the downlink")


def test_item16_dense_downlinks_are_accepted():
    for chain in ("fp16", "q8", "q8 | zstd"):
        build(load_config(small(compression={"downlink": chain})), store=False)


@pytest.mark.parametrize("privacy,key", [
    ({"noise_multiplier": 2.0}, "privacy.noise_multiplier = 2.0"),
    ({"clip_norm": 0.5}, "privacy.clip_norm = 0.5"),
    ({"budget_epsilon": 3.0}, "privacy.budget_epsilon = 3.0"),
    ({"secagg_threshold": 3}, "privacy.secagg_threshold = 3"),
])
def test_item16_privacy_keys_with_mode_none(privacy, key):
    with pytest.raises(ConfigError) as exc:
        load_config(small(privacy=privacy))
    assert key in str(exc.value) and "not used with privacy.mode = 'none'" in str(exc.value)


def test_item16_privacy_config_round_trips_through_toml(tmp_path):
    cfg = load_config(small(privacy={"mode": "central", "noise_multiplier": 2.0}))
    p = tmp_path / "c.toml"
    p.write_text(cfg.to_toml())
    assert load_config(p) == cfg
    plain = load_config(small())
    p.write_text(plain.to_toml())  # every privacy key written out at its default: accepted
    assert load_config(p) == plain


def test_item16_duplicated_ladder_rungs_and_oversized_sketches():
    with pytest.raises(ConfigError, match=r"compression.ladder = .*lists \['q8'\] more than once"):
        load_config(small(compression={"adaptive": True, "ladder": ["q8", " q8", "q4:stochastic"]}))
    refused(small(compression={"uplink": "sketch:1000000000"}), "compression.uplink = 'sketch:1000000000'", "larger than the model")


# -- 17: one exception family, and a RunConfig handed to the API is validated --------------------
def test_item17_one_exception_family():
    assert issubclass(fleetlearn.ConfigError, fleetlearn.FleetlearnError)
    assert issubclass(fleetlearn.DataError, fleetlearn.ConfigError)
    assert issubclass(fleetlearn.RunFailedError, fleetlearn.FleetlearnError)
    assert issubclass(fleetlearn.ConfigError, ValueError)  # what callers caught before
    from fleetlearn.data import DataError

    assert DataError is fleetlearn.DataError
    for name in ("FleetlearnError", "ConfigError", "DataError", "RunFailedError"):
        assert name in fleetlearn.__all__


@pytest.mark.parametrize("bad", [
    lambda: fleetlearn.run(small(server={"over_selection": math.inf}), store=False),  # was OverflowError
    lambda: fleetlearn.run(small(monitoring={"prometheus_port": 0, "prometheus_host": "no.such.host.invalid"}), store=False),  # gaierror
    lambda: RunConfig(server={"rounds": 0}),  # was pydantic's ValidationError
    lambda: setattr(RunConfig().server, "rounds", 0),
    lambda: RunConfig.model_validate({"server": {"bogus": 1}}),
    lambda: fleetlearn.run(["not", "a", "config"], store=False),
    lambda: fleetlearn.run(small(), overrides="server.rounds=2", store=False),
])
def test_item17_bad_input_to_the_api_is_a_fleetlearn_error(bad):
    with pytest.raises(fleetlearn.FleetlearnError):
        bad()


def test_item17_model_copy_cannot_skip_validation():
    cfg = load_config(small())
    bad = cfg.model_copy(update={"server": cfg.server.model_copy(update={"rounds": 0})})
    with pytest.raises(ConfigError, match=r"server.rounds = 0"):
        fleetlearn.run(bad, store=False)
    worse = cfg.model_copy(update={"client": cfg.client.model_copy(update={"lr": math.inf})})
    with pytest.raises(ConfigError, match=r"client.lr = inf"):
        load_config(worse)
    assert load_config(cfg) is cfg  # a valid config is passed through as it is


# -- 21: the config's folder does not shadow installed packages ---------------------------------
def test_item21_a_folder_next_to_the_config_cannot_shadow_a_package(tmp_path):
    folder = tmp_path / "configs"  # not the working directory, which `python -m` itself puts first
    (folder / "sklearn").mkdir(parents=True)
    marker = tmp_path / "shadowed"
    (folder / "sklearn" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nraise SystemExit(7)\n")
    (folder / "digits.toml").write_text("[server]\nrounds = 1\ncohort = 5\n[data]\nclients = 10\n[client]\nlocal_epochs = 1\n")
    env = dict(os.environ, COLUMNS="120")
    p = subprocess.run([sys.executable, "-m", "fleetlearn", "run", "configs/digits.toml", "--quiet", "--json"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300, env=env)
    assert not marker.exists(), "the config's folder shadowed the installed sklearn"
    assert p.returncode == 0, p.stderr


def test_item21_the_folder_is_appended_and_only_for_import_paths(tmp_path, monkeypatch):
    from fleetlearn.config import add_config_dir_to_path

    monkeypatch.setattr(sys, "path", list(sys.path))
    folder = str(tmp_path.resolve())
    plain = load_config(small())
    add_config_dir_to_path(tmp_path / "c.toml", plain)
    assert folder not in sys.path  # a config without import paths adds nothing
    add_config_dir_to_path(tmp_path / "c.toml", load_config(small(model={"name": "my_models:make"})))
    assert sys.path[-1] == folder and sys.path[0] != folder
