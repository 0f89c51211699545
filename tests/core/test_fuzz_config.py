"""The seeded config fuzz (benchmarks/fuzz_config.py) as a test: 1000 malformed configs and
overrides over every section, the CLI's --set and the Python API, built without training,
plus 12 one-round runs; no traceback, no run that exits 0 with every round failed, no hang,
no crash.  About 75 s on 2 cores (each case forks from one process that imported fleetlearn)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_config_fuzz_has_no_traceback_hang_crash_or_silent_failure(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "fuzz_config.py"), "--cases", "1000", "--runs", "12", "--seed", "0",
           "--timeout", "20", "--run-timeout", "60", "--workers", "2", "--json"]
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="120")
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["cases"] == 1000 + 12 and summary["channels"]["run"] == 12
    assert {"data", "model", "client", "server", "devices", "compression", "privacy", "attack", "personalization",
            "monitoring", "distill", "engine", "canary", "store"} <= set(summary["sections"])
    assert {k: summary[k] for k in ("traceback", "failed_ok", "hang", "crash")} == {"traceback": 0, "failed_ok": 0, "hang": 0, "crash": 0}, p.stderr[-4000:]
    assert summary["refused"] > 500 and summary["accepted"] > 100
    assert p.returncode == 0, p.stderr[-4000:]
