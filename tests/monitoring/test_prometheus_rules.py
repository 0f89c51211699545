"""deploy/prometheus/alerts.yml passes `promtool check rules`, and its unit tests
(alerts_test.yml) pass `promtool test rules`; the rules name only metrics fleetlearn exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from fleetlearn.monitoring import PrometheusExporter

RULES_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool (Debian's `prometheus` package) is not installed (.ci/run installs it)")
    return path


def test_promtool_checks_the_rules():
    out = subprocess.run([promtool(), "check", "rules", "alerts.yml"], cwd=RULES_DIR, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_unit_tests_pass():
    out = subprocess.run([promtool(), "test", "rules", "alerts_test.yml"], cwd=RULES_DIR, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_rules_use_only_exported_metric_names():
    exported = set()
    for family in PrometheusExporter().registry.collect():
        # labelled families have no samples yet: a counter is exposed as NAME_total
        exported.add(family.name + "_total" if family.type == "counter" else family.name)
    rules = yaml.safe_load((RULES_DIR / "alerts.yml").read_text())
    used = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            used |= set(re.findall(r"\bfleetlearn_[a-z0-9_]+", rule["expr"]))
    assert used, "no fleetlearn metric in the rules"
    assert used <= exported, f"rules name metrics fleetlearn does not export: {sorted(used - exported)}"
