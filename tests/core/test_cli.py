import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = [sys.executable, "-m", "fleetlearn"]


def fl(*args, cwd, timeout=300):
    env = dict(os.environ, COLUMNS="120")
    return subprocess.run([*BIN, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


# Runs the CLI in a fresh interpreter, then prints whether it imported torch (on stderr's last line).
_TORCH_PROBE = ("import sys\nfrom fleetlearn.cli import main\ntry:\n    code = main(sys.argv[1:])\nexcept SystemExit as e:\n"
                "    code = e.code\nprint('torch loaded:', 'torch' in sys.modules, file=sys.stderr)\nsys.exit(code)")


def fl_light(*args, cwd):
    """`fl` for a command that must answer without torch (a second of start-up): asserts it did."""
    env = dict(os.environ, COLUMNS="120")
    p = subprocess.run([sys.executable, "-c", _TORCH_PROBE, *args], cwd=cwd, capture_output=True, text=True, timeout=120, env=env)
    last = p.stderr.strip().splitlines()[-1]
    assert last == "torch loaded: False", (args, p.stderr[-2000:])
    return p


def test_help_and_an_empty_runs_list_do_not_load_torch(tmp_path):
    assert fl_light("--help", cwd=tmp_path).stdout.startswith("usage: fleetlearn")
    assert "--attack" in fl_light("client", "--help", cwd=tmp_path).stdout
    assert fl_light("runs", cwd=tmp_path).returncode == 0


def test_token_and_certs_commands_do_not_load_torch(tmp_path):
    tok = fl_light("token", "add", "phone", "--state", "st", cwd=tmp_path).stdout.strip()
    assert len(tok) >= 32
    listed = [json.loads(line) for line in fl_light("token", "list", "--state", "st", cwd=tmp_path).stdout.splitlines()]
    assert [(i["name"], i["revoked_at"]) for i in listed] == [("phone", None)] and tok not in json.dumps(listed)
    assert fl_light("token", "revoke", "phone", "--state", "st", cwd=tmp_path).stdout.strip() == "revoked phone"
    assert "certificates written to" in fl_light("certs", "--out", "certs", cwd=tmp_path).stdout
    assert (tmp_path / "certs" / "ca.pem").is_file()


def test_run_json_ends_with_the_summary_line(tmp_path):
    p = fl("run", "--json", "--set", "server.rounds=5", "--set", "server.cohort=10", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    last = p.stdout.strip().splitlines()[-1]
    summary = json.loads(last)
    for key in ("run_id", "run_dir", "rounds", "final_accuracy", "best_accuracy", "uplink_bytes", "downlink_bytes", "sim_seconds", "wall_seconds", "compression_ratio"):
        assert key in summary
    assert summary["rounds"] == 5 and summary["uplink_bytes"] > 0
    run_dir = tmp_path / summary["run_dir"]
    assert (run_dir / "run.db").is_file() and (run_dir / "config.toml").is_file()
    assert list((run_dir / "checkpoints").glob("*.safetensors"))

    ls = fl_light("runs", cwd=tmp_path)  # reading the store needs no torch
    assert ls.returncode == 0 and summary["run_id"] in ls.stdout
    show = fl_light("show", summary["run_id"], "--json", cwd=tmp_path)
    assert show.returncode == 0
    rounds = json.loads(show.stdout)["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5]
    table = fl_light("show", summary["run_id"], cwd=tmp_path)
    assert table.returncode == 0 and "accuracy" in table.stdout


@pytest.mark.parametrize("args,files,needle", [
    (["run", "bad.toml"], {"bad.toml": "[server\nrounds=1"}, "malformed TOML"),
    (["run", "--set", "server.bogus=1"], {}, "server.bogus: unknown key"),
    (["run", "--set", "server.cohort=-3"], {}, "server.cohort = -3"),
    (["run", "--set", "server.cohort=1000"], {}, "exceeds the number of clients"),
    (["run", "--set", "data.dataset=\"mnist\""], {}, "unknown dataset 'mnist'"),
    (["run", "--set", "data.dataset=fashion_mnist", "--set", "data.path=\"/nonexistent/fmnist\""], {}, "/nonexistent/fmnist"),
    (["run", "missing.toml"], {}, "config file not found"),
    (["show", "no-such-run"], {}, "no run found"),
])
def test_bad_input_exits_2_with_one_line_and_no_traceback(tmp_path, args, files, needle):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    p = fl(*args, cwd=tmp_path, timeout=120)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout
    assert needle in p.stderr
    assert p.stderr.startswith("fleetlearn: error:")


@pytest.mark.parametrize("cmd", [[], ["run"], ["runs"], ["show"]])
def test_help_everywhere(tmp_path, cmd):
    p = fl(*cmd, "--help", cwd=tmp_path)
    assert p.returncode == 0 and "usage: fleetlearn" in p.stdout


def test_examples_parse_and_the_custom_model_example_trains(tmp_path):
    import fleetlearn
    from fleetlearn.config import load_config

    root = Path(__file__).resolve().parents[2] / "examples"
    for toml in root.glob("*.toml"):
        load_config(toml)
    s = fleetlearn.run(root / "custom_model.toml", overrides=["server.rounds=3", f"store.root={json.dumps(str(tmp_path))}"])
    assert s.rounds == 3 and s.final_accuracy > 0.5


def test_run_resume_continues_an_interrupted_simulation_to_the_same_model(tmp_path):
    import torch

    from fleetlearn.config import load_config
    from fleetlearn.engine import build_coordinator
    from fleetlearn.ops import RunStore

    cfg = load_config({
        "data": {"clients": 20}, "server": {"rounds": 5, "cohort": 6}, "client": {"local_epochs": 1},
        "compression": {"uplink": "ef | topk:0.1"}, "store": {"root": str(tmp_path / "runs")},
    })
    whole = build_coordinator(cfg, store=True)
    whole.run()
    cut = build_coordinator(cfg, store=True)
    for _ in range(2):
        cut.run_round()  # ... and the process dies here
    cut.store.close()  # (its death releases the run's lock)
    run_dir = cut.store.run_dir
    p = fl("run", "--resume", str(run_dir), "--json", "--quiet", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["rounds"] == 5 and summary["run_id"] == run_dir.name
    assert [r.round for r in RunStore.open(run_dir).records()] == [1, 2, 3, 4, 5]
    _, resumed, _ = RunStore.open(run_dir).load_checkpoint()
    assert torch.equal(resumed, whole.params)
    both = fl("run", "x.toml", "--resume", str(run_dir), cwd=tmp_path)
    assert both.returncode == 2 and "not both" in both.stderr


# -- run directories that went wrong ------------------------------------------------------
@pytest.fixture(scope="module")
def cut_run(tmp_path_factory):
    """A real run of 4 rounds whose process died after round 2 (its lock released), and the
    model the uninterrupted run ends with."""
    from fleetlearn.config import load_config
    from fleetlearn.engine import build_coordinator

    root = tmp_path_factory.mktemp("cut")
    cfg = load_config({"data": {"clients": 20}, "server": {"rounds": 4, "cohort": 6}, "client": {"local_epochs": 1},
                       "store": {"root": str(root / "runs")}})
    whole = build_coordinator(cfg, store=True)
    whole.run()
    whole.store.close()
    cut = build_coordinator(cfg, store=True)
    for _ in range(2):
        cut.run_round()
    cut.store.close()
    return cut.store.run_dir, whole.params.clone()


def _copy(run_dir, tmp_path):
    import shutil

    dst = tmp_path / "runs" / run_dir.name
    shutil.copytree(run_dir, dst)
    return dst


def _checkpoint_bytes(run_dir):
    return {p.name: p.read_bytes() for p in sorted((run_dir / "checkpoints").iterdir())}


def cli(capsys, *argv):
    """The CLI in this process: bad input returns 2 with one line on stderr (an exception
    escaping here is the traceback a user would see)."""
    from fleetlearn.cli import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_resume_refuses_a_run_whose_database_was_emptied_and_keeps_its_checkpoints(cut_run, tmp_path, capsys):
    run_dir = _copy(cut_run[0], tmp_path)
    before = _checkpoint_bytes(run_dir)
    (run_dir / "run.db").write_bytes(b"")
    rc, _, err = cli(capsys, "run", "--resume", run_dir, "--quiet")
    assert rc == 2, err
    assert err.startswith("fleetlearn: error:") and "run.db is an empty file" in err and "cannot be resumed" in err
    assert _checkpoint_bytes(run_dir) == before  # round 1 was not trained again over them
    assert (run_dir / "run.db").stat().st_size == 0


def test_resume_and_export_name_a_deleted_latest_checkpoint(cut_run, tmp_path, capsys):
    run_dir = _copy(cut_run[0], tmp_path)
    latest = run_dir / "checkpoints" / "v000002.safetensors"
    latest.unlink()
    rc, _, err = cli(capsys, "run", "--resume", run_dir, "--quiet")
    assert rc == 2 and f"is missing: {latest}" in err, err
    rc, _, err = cli(capsys, "models", "export", run_dir, "2", "--out", tmp_path / "m.safetensors")
    assert rc == 2 and f"is missing: {latest}" in err, err
    from fleetlearn.ops import RunStore

    assert [r.round for r in RunStore.open(run_dir).records()] == [1, 2]


def damage_tables(db, *tables):
    """Overwrite the root page of each table with garbage (a damaged database page)."""
    import sqlite3

    conn = sqlite3.connect(db)
    page = conn.execute("pragma page_size").fetchone()[0]
    roots = [conn.execute("select rootpage from sqlite_master where type = 'table' and name = ?", (t,)).fetchone()[0] for t in tables]
    conn.close()
    data = bytearray(db.read_bytes())
    for root in roots:
        data[(root - 1) * page: root * page] = b"\xa5" * page
    db.write_bytes(bytes(data))


def test_a_damaged_database_page_is_a_clear_error_in_report_models_list_and_show(cut_run, tmp_path, capsys):
    run_dir = _copy(cut_run[0], tmp_path)
    db = run_dir / "run.db"
    damage_tables(db, "rounds", "model_versions")
    for argv in (["report", run_dir], ["models", "list", run_dir], ["show", run_dir]):
        rc, _, err = cli(capsys, *argv)
        assert rc == 2, (argv, err)
        assert f"run store {db.resolve()}: database disk image is malformed" in err and "damaged" in err, (argv, err)


def _without_write_access():
    """How to run a command that the permission bits bind: as root, without the capabilities
    that bypass them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH)."""
    import shutil

    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: a read-only directory cannot be made binding")
    drop = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}"]


_DRIVER = r"""
import contextlib, io, json, sys, traceback
from fleetlearn.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
    except BaseException:
        rc, err = "traceback", io.StringIO(traceback.format_exc())
    results.append({"argv": argv, "rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps(results))
"""


def test_a_read_only_run_directory_is_shown_and_reported_but_not_resumed_or_promoted(cut_run, tmp_path):
    run_dir = _copy(cut_run[0], tmp_path)
    out_dir = tmp_path / "elsewhere"
    commands = [
        ["show", str(run_dir), "--json"],
        ["models", "list", str(run_dir), "--json"],
        ["report", str(run_dir)],
        ["report", str(run_dir), "--out", str(out_dir)],
        ["models", "promote", str(run_dir), "2"],
        ["run", "--resume", str(run_dir), "--quiet"],
    ]
    for p in [run_dir, *run_dir.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        p = subprocess.run([*_without_write_access(), sys.executable, "-c", _DRIVER, json.dumps(commands)],
                           cwd=tmp_path, capture_output=True, text=True, timeout=600)
    finally:
        for q in [run_dir, *run_dir.rglob("*")]:
            q.chmod(0o755 if q.is_dir() else 0o644)
    assert p.returncode == 0, p.stderr[-3000:]
    show, models, report, report_out, promote, resume = json.loads(p.stdout.strip().splitlines()[-1])
    for r in (show, models, report, report_out, promote, resume):
        assert r["rc"] != "traceback", r["stderr"]
    assert show["rc"] == 0 and [x["round"] for x in json.loads(show["stdout"])["rounds"]] == [1, 2]
    assert models["rc"] == 0 and [v["version"] for v in json.loads(models["stdout"])] == [1, 2]
    assert report["rc"] == 2 and str(run_dir / "report") in report["stderr"] and "--out DIR" in report["stderr"]
    assert report_out["rc"] == 0 and (out_dir / "report.html").is_file()
    assert promote["rc"] == 2 and "read-only" in promote["stderr"] and str(run_dir / "run.db") in promote["stderr"]
    assert resume["rc"] == 2 and f"run directory {run_dir} is not writable" in resume["stderr"]


def test_two_resumes_of_one_run_at_once_the_second_is_refused_and_the_checkpoints_stay_valid(cut_run, tmp_path):
    import signal
    import time

    import torch

    from fleetlearn.ops import RunStore

    run_dir, final = _copy(cut_run[0], tmp_path), cut_run[1]
    env = dict(os.environ, COLUMNS="120")
    first = subprocess.Popen([*BIN, "run", "--resume", str(run_dir), "--quiet", "--json"], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and first.poll() is None:
            lock = run_dir / ".lock"
            if lock.is_file() and lock.read_text().strip() == str(first.pid):
                break
            time.sleep(0.02)
        assert first.poll() is None, first.communicate()[1][-3000:]
        os.kill(first.pid, signal.SIGSTOP)  # the first holds the run, wherever it is in its work
        second = fl("run", "--resume", str(run_dir), "--quiet", "--json", cwd=tmp_path)
        os.kill(first.pid, signal.SIGCONT)
        out, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGCONT)
            first.kill()
    assert second.returncode == 2, second.stderr
    assert f"in use by another process (pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
    assert first.returncode == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["rounds"] == 4
    store = RunStore.open(run_dir)
    assert [r.round for r in store.records()] == [1, 2, 3, 4]
    for row in store.checkpoint_rows():  # every committed checkpoint matches its recorded sha256
        assert store.load_checkpoint(row["version"])[0] == row["version"]
    assert torch.equal(store.load_checkpoint()[1], final)  # the uninterrupted run's model


@pytest.mark.parametrize("override,needle", [
    ("model.hidden=[64]", "--set model.hidden: cannot change on --resume"),
    ("seed=3", "--set seed: cannot change on --resume"),
    ('data.partition="iid"', "--set data.partition: cannot change on --resume"),
    ("client.lr=0.5", "--set client.lr: cannot change on --resume"),
    ("server.rounds=1", "--set server.rounds=1: run"),
])
def test_resume_set_refuses_a_key_that_is_not_safe_to_change(cut_run, tmp_path, capsys, override, needle):
    from fleetlearn.ops import RunStore

    run_dir = _copy(cut_run[0], tmp_path)
    config, before = (run_dir / "config.toml").read_text(), _checkpoint_bytes(run_dir)
    rc, _, err = cli(capsys, "run", "--resume", run_dir, "--quiet", "--set", override)
    assert rc == 2 and needle in err, err
    assert (run_dir / "config.toml").read_text() == config and _checkpoint_bytes(run_dir) == before
    store = RunStore.open(run_dir, lock=True)  # the refused resume released the run
    assert [r.round for r in store.records()] == [1, 2] and store.resume_overrides() == []
    store.close()


def test_resume_set_records_each_accepted_change_in_config_toml_and_the_run(cut_run, tmp_path, capsys):
    from fleetlearn.config import load_config
    from fleetlearn.ops import RunStore

    run_dir = _copy(cut_run[0], tmp_path)
    rc, out, err = cli(capsys, "run", "--resume", run_dir, "--quiet", "--json", "--set", "server.rounds=5", "--set", "engine.threads=1",
                       "--set", "server.cohort=6")  # the value it has: allowed, nothing recorded
    assert rc == 0, err
    assert json.loads(out.strip().splitlines()[-1])["rounds"] == 5
    cfg = load_config(run_dir / "config.toml")
    assert cfg.server.rounds == 5 and cfg.engine.threads == 1 and cfg.seed == 0
    store = RunStore.open(run_dir)
    assert [r.round for r in store.records()] == [1, 2, 3, 4, 5]
    assert [{k: o[k] for k in ("round", "key", "old", "new")} for o in store.resume_overrides()] == [
        {"round": 3, "key": "server.rounds", "old": 4, "new": 5},
        {"round": 3, "key": "engine.threads", "old": "auto", "new": 1},
    ]
    assert "rounds = 5" in store.info()["config_toml"]
    rc, out, _ = cli(capsys, "show", run_dir, "--json")
    assert rc == 0 and [o["key"] for o in json.loads(out)["resume_overrides"]] == ["server.rounds", "engine.threads"]
    with pytest.raises(SystemExit):
        cli(capsys, "run", "--help")
    helptext = " ".join(capsys.readouterr().out.split())
    assert "--set may change only server.rounds, server.eval_every" in helptext


def test_certs_force_leaves_every_key_0600_whatever_existed_before(tmp_path, capsys):
    out = tmp_path / "certs"
    out.mkdir()
    for name in ("ca", "server", "client"):
        (out / f"{name}.key").write_text("old key")
        (out / f"{name}.key").chmod(0o644)
        (out / f"{name}.pem").write_text("old cert")
    rc, _, err = cli(capsys, "certs", "--out", out, "--force")
    assert rc == 0, err
    for name in ("ca", "server", "client"):
        key = out / f"{name}.key"
        assert oct(key.stat().st_mode & 0o777) == oct(0o600), name
        assert key.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
