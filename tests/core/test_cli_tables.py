"""The CLI's tables fit the terminal: whole headers, whole values, the important columns first."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from rich.console import Console

from fleetlearn.cli_tables import ColumnError, FitTable, parse_columns

SHOW_COLUMNS = ["round", "version", "status", "accuracy", "loss", "fed acc", "local acc", "accepted", "dropped",
                "rejected", "uplink", "downlink", "sim s"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from fleetlearn.cli import main

    root = tmp_path_factory.mktemp("runs")
    assert main(["run", "--set", "server.rounds=2", "--set", "data.clients=20", "--set", "server.cohort=5",
                 "--runs-dir", str(root), "--quiet"]) == 0
    (run,) = root.iterdir()
    return run


def _fleetlearn(*argv, columns: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": str(columns)}
    return subprocess.run([sys.executable, "-m", "fleetlearn", *map(str, argv)], capture_output=True, text=True, env=env,
                          timeout=120)


def _headers(out: str) -> list[str]:
    line = next(ln for ln in out.splitlines() if ln.startswith("┃"))
    return [h.strip() for h in line.strip("┃").split("┃")]


def test_show_at_80_columns_has_whole_headers_and_the_key_columns(run_dir):
    p = _fleetlearn("show", run_dir, columns=80)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    table = [ln for ln in lines if ln[:1] in "┏┃┡│└"]
    assert table and all(len(ln) <= 80 for ln in table), "\n".join(table)
    heads = _headers(p.stdout)
    assert all(h in SHOW_COLUMNS for h in heads), heads  # every shown header is a whole column name
    for needed in ("round", "accuracy", "accepted", "uplink"):
        assert needed in heads
    assert "…" not in p.stdout  # no value or header cut to an ellipsis
    left_out = [c for c in SHOW_COLUMNS if c not in heads]
    assert left_out, "13 columns cannot all fit 80 characters"
    note = next(ln for ln in lines if "left out to fit 80 characters" in ln)
    assert all(c in note for c in left_out) and "--wide" in note
    # the rows are whole: round 2's accepted count reads "5/5"
    assert any(ln.startswith("│") and "5/5" in ln for ln in table)


def test_show_wide_and_columns(run_dir):
    wide = _fleetlearn("show", run_dir, "--wide", columns=80)
    assert wide.returncode == 0, wide.stderr
    assert _headers(wide.stdout) == SHOW_COLUMNS
    assert "left out" not in wide.stdout
    some = _fleetlearn("show", run_dir, "--columns", "round, loss,sim s", columns=80)
    assert some.returncode == 0, some.stderr
    assert _headers(some.stdout) == ["round", "loss", "sim s"]  # display order, not the order asked
    bad = _fleetlearn("show", run_dir, "--columns", "round,acuracy", columns=80)
    assert bad.returncode == 2
    assert "no column 'acuracy'" in bad.stderr and "accuracy" in bad.stderr and "Traceback" not in bad.stderr


def test_runs_and_models_list_fit_too(run_dir):
    for argv in (("runs", "--runs-dir", run_dir.parent), ("models", "list", run_dir)):
        p = _fleetlearn(*argv, columns=60)
        assert p.returncode == 0, p.stderr
        table = [ln for ln in p.stdout.splitlines() if ln[:1] in "┏┃┡│└"]
        assert table and all(len(ln) <= 60 for ln in table), "\n".join(table)
        assert "…" not in p.stdout


def test_choose_keeps_priority_columns_in_display_order():
    t = FitTable("t", ["a", "bbbbbbbbbb", "c", "d"], priority=["d", "a"])
    t.add_row("1", "2", "3", "4")
    # a and d (priority) cost 4 each, plus the border: 9; c next costs 4 (13); b needs 13 more
    assert t.choose(13) == [0, 2, 3]
    assert t.choose(9) == [0, 3]
    assert t.choose(5) == [3]  # the first-priority column shows even when nothing fits
    assert t.choose(5, wide=True) == [0, 1, 2, 3]
    assert t.choose(5, only=["c", "a"]) == [0, 2]
    with pytest.raises(ColumnError, match="no column 'x'"):
        t.choose(80, only=["x"])
    with pytest.raises(ValueError, match="a row of 2 cells for 4 columns"):
        t.add_row("1", "2")


def test_a_table_asked_wider_than_the_terminal_is_printed_whole():
    t = FitTable("t", ["alpha", "beta", "gamma"])
    t.add_row("x" * 30, "y" * 30, "z" * 30)
    buf = io.StringIO()
    hidden = t.render(Console(file=buf, width=40), wide=True)
    assert hidden == []
    text = buf.getvalue()
    assert "x" * 30 in text and "y" * 30 in text and "z" * 30 in text and "…" not in text


def test_parse_columns():
    assert parse_columns(None) is None
    assert parse_columns(" a, b ,,c") == ["a", "b", "c"]
    with pytest.raises(ColumnError):
        parse_columns(" , ")
