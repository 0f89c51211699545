"""Shared real runs for the monitoring tests (each a few seconds: run once per session).

`clean_run`: a small digits run with the monitoring hooks and no fault.
`guarded_run`: the same configuration with a fault injected by a hook placed
before the guardrail (round 4: parameters x 1e3; round 5: NaN parameters),
stored in a run directory, with a Prometheus exporter serving on a free port.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from monitoring_runs import FAULT_ROUNDS, SMALL, InjectFault

import fleetlearn
from fleetlearn.monitoring import MonitoringParts, build_monitoring
from fleetlearn.records import RunSummary


@dataclass
class GuardedRun:
    summary: RunSummary
    monitoring: MonitoringParts
    fault: InjectFault


@pytest.fixture(scope="session")
def clean_run() -> RunSummary:
    return fleetlearn.run(SMALL, store=False, hooks=build_monitoring({}).hooks)


@pytest.fixture(scope="session")
def guarded_run(tmp_path_factory) -> GuardedRun:
    root = tmp_path_factory.mktemp("runs")
    parts = build_monitoring({"guardrail": ["divergence"], "prometheus_port": 0})
    parts.start()
    fault = InjectFault(FAULT_ROUNDS)
    summary = fleetlearn.run({**SMALL, "store": {"root": str(root)}}, hooks=[fault] + parts.hooks)
    yield GuardedRun(summary, parts, fault)
    parts.stop()
