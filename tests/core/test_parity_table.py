"""The parity table of docs/architecture.md (section 3.4) says which feature runs on which
backend.  Its capability rows must agree with what the transports declare, and the
server-side rows that no other gRPC test covers run here over gRPC."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

import fleetlearn.transport  # noqa: F401  (registers the transports)
from fleetlearn.compat import has

DOC = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"
BACKENDS = ("simulation", "ray", "grpc")


def _rows() -> list[list[str]]:
    text = DOC.read_text(encoding="utf-8")
    start = text.index("| feature | config / command | capability | simulation | Ray | gRPC |")
    rows = []
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))])
    return rows


def test_the_table_is_there_and_every_row_has_a_cell_per_backend():
    rows = _rows()
    assert len(rows) >= 15
    assert all(len(r) == 6 for r in rows), [r for r in rows if len(r) != 6]


def test_capability_rows_agree_with_what_the_transports_declare():
    checked = 0
    for feature, _, cap, *cells in _rows():
        m = re.fullmatch(r"`(\w+)`", cap)
        if not m:
            assert cap.startswith("("), f"{feature}: capability cell {cap!r} is neither `name` nor (server-side ...)"
            assert all(c.startswith("yes") for c in cells), f"{feature}: a server-side part runs wherever the Coordinator does"
            continue
        for backend, cell in zip(BACKENDS, cells):
            declared = has("transport", backend, m.group(1))
            assert cell.startswith("yes") == declared, f"{feature} on {backend}: the table says {cell!r}, the registry {declared}"
            if not declared:
                assert re.match(r"(refused: a matter of code|cannot exist)", cell), f"{feature} on {backend}: say why: {cell!r}"
        checked += 1
    assert checked >= 7


# -- server-side rows over gRPC that have no test of their own ---------------------------------------
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "transport"))

BASE = {"seed": 2, "data": {"dataset": "digits", "clients": 8}, "server": {"cohort": 3, "rounds": 2, "deadline_s": 30.0},
        "model": {"hidden": [16]}, "client": {"local_epochs": 1, "batch_size": 16}, "monitoring": {"detectors": []}}
SERVER_SIDE = {
    "central_dp": ({"privacy": {"mode": "central", "noise_multiplier": 0.5, "clip_norm": 1.0},
                    "server": {"selector": "random"}},
                   lambda r: r.extra.get("dp_epsilon", 0) > 0),
    "local_dp": ({"privacy": {"mode": "local", "noise_multiplier": 0.5, "clip_norm": 1.0}},
                 lambda r: r.extra.get("dp_epsilon", 0) > 0),
    "count_sketch": ({"compression": {"uplink": "sketch:50"}}, lambda r: 0 < r.uplink_bytes < 0.9 * 3 * 1210 * 4),  # below float32
    "feddf": ({"distill": {"method": "feddf", "steps": 2}}, lambda r: "feddf_kl_after" in r.extra),
    "regions": ({"engine": {"regions": 2}}, lambda r: r.extra.get("hierarchy_regions") == 2),
}


@pytest.mark.slow
@pytest.mark.parametrize("feature", sorted(SERVER_SIDE))
def test_server_side_features_run_over_grpc(feature, tmp_path):
    from grpc_test_support import NetworkRun

    from fleetlearn.config import load_config

    extra, check = SERVER_SIDE[feature]
    cfg = {k: ({**BASE.get(k, {}), **extra.get(k, {})} if k != "seed" else BASE[k]) for k in {*BASE, *extra}}
    summary = NetworkRun(load_config(cfg), tmp_path, clients=3).run()
    assert [r.status for r in summary.records] == ["ok", "ok"], [r.reason for r in summary.records]
    assert all(r.accepted == 3 for r in summary.records)
    assert all(check(r) for r in summary.records), [dict(r.extra) for r in summary.records]
