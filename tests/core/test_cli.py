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

    ls = fl("runs", cwd=tmp_path)
    assert ls.returncode == 0 and summary["run_id"] in ls.stdout
    show = fl("show", summary["run_id"], "--json", cwd=tmp_path)
    assert show.returncode == 0
    rounds = json.loads(show.stdout)["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5]
    table = fl("show", summary["run_id"], cwd=tmp_path)
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
