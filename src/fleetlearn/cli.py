"""The `fleetlearn` command: a thin layer over the Python API.

Bad input (config, data, store) prints one short line naming the problem and
exits with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from .config import ConfigError, add_config_dir_to_path, load_config
from .records import RoundRecord, RunSummary

EXIT_USAGE = 2


class UsageError(Exception):
    """An error of the user's input, reported in one line with exit status 2."""


def _fmt(x: float | None, spec: str = ".4f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


# -- fleetlearn run ---------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from .data import DataError
    from .engine import build_coordinator
    from .ops import StoreError

    overrides = list(args.set or [])
    if args.runs_dir:
        overrides.append(f"store.root={json.dumps(args.runs_dir)}")
    try:
        if args.config:
            add_config_dir_to_path(args.config)
        cfg = load_config(args.config, overrides)
        console = Console(stderr=args.json)
        with console.status("loading data and building the run..."):
            coordinator = build_coordinator(cfg)
    except (ConfigError, DataError, StoreError) as exc:
        raise UsageError(str(exc)) from None

    total = cfg.server.rounds
    progress = Progress(
        TextColumn("[bold]round"),
        MofNCompleteColumn(),
        BarColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
        disable=args.quiet,
    )
    t0 = time.perf_counter()
    with progress:
        task = progress.add_task("train", total=total, status="")

        def on_round(rec: RoundRecord) -> None:
            status = f"acc {_fmt(rec.accuracy)}  loss {_fmt(rec.loss)}  up {_bytes(rec.uplink_bytes)}  sim {rec.sim_seconds:.1f}s"
            if rec.status != "ok":
                status += f"  [red]{rec.status}: {rec.reason}"
            progress.update(task, advance=1, status=status)

        try:
            summary = coordinator.run(on_round=on_round)
        except KeyboardInterrupt:
            if coordinator.store is not None:
                coordinator.store.finish(coordinator.summary(time.perf_counter() - t0).to_json_dict(), status="interrupted")
            console.print("[yellow]interrupted; the rounds so far are in the run store")
            return 130
    if not args.quiet:
        _print_summary(console, summary)
    if args.json:
        print(json.dumps(summary.to_json_dict()), flush=True)
    return 0


def _print_summary(console: Console, s: RunSummary) -> None:
    t = Table(title=f"run {s.run_id}", show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    rows = [
        ("run directory", s.run_dir),
        ("rounds", str(s.rounds) + (f" ({s.failed_rounds} failed)" if s.failed_rounds else "")),
        ("final accuracy", _fmt(s.final_accuracy)),
        ("best accuracy", _fmt(s.best_accuracy)),
        ("final loss", _fmt(s.final_loss)),
        ("uplink", _bytes(s.uplink_bytes)),
        ("downlink", _bytes(s.downlink_bytes)),
        ("compression ratio", _fmt(s.compression_ratio, ".2f")),
        ("simulated time", f"{s.sim_seconds:.1f} s"),
        ("wall time", f"{s.wall_seconds:.2f} s"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)


# -- fleetlearn runs / show ---------------------------------------------------------
def cmd_runs(args: argparse.Namespace) -> int:
    from .ops import list_runs

    items = list_runs(args.runs_dir)
    if args.json:
        print(json.dumps(items, default=str))
        return 0
    console = Console()
    if not items:
        console.print(f"no runs under {args.runs_dir}/")
        return 0
    t = Table(title=f"runs in {args.runs_dir}/")
    for col in ("run", "name", "status", "created", "rounds", "final accuracy"):
        t.add_column(col)
    for it in items:
        created = it.get("created_at")
        t.add_row(
            it["run_id"], it.get("name") or "", str(it.get("status")),
            created.strftime("%Y-%m-%d %H:%M:%S") if hasattr(created, "strftime") else str(created or ""),
            str(it.get("rounds_done", "")), _fmt(it.get("final_accuracy")),
        )
    console.print(t)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from .ops import RunStore, StoreError

    try:
        store = RunStore.open(args.run, args.runs_dir)
        info = store.info()
        records = store.records()
    except StoreError as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        print(json.dumps({"run": {k: v for k, v in info.items() if k != "config_toml"}, "rounds": [r.to_dict() for r in records]}, default=str))
        return 0
    console = Console()
    t = Table(title=f"run {info['run_id']} ({info['status']})")
    for col in ("round", "version", "status", "accuracy", "loss", "fed acc", "local acc", "accepted", "dropped", "rejected", "uplink", "downlink", "sim s"):
        t.add_column(col, justify="right")
    for r in records:
        t.add_row(
            str(r.round), str(r.version), r.status, _fmt(r.accuracy), _fmt(r.loss), _fmt(r.fed_accuracy),
            _fmt(r.local_accuracy), f"{r.accepted}/{r.selected}", str(r.dropped), str(r.rejected),
            _bytes(r.uplink_bytes), _bytes(r.downlink_bytes), f"{r.sim_seconds:.2f}",
        )
    console.print(t)
    summary = info.get("summary")
    if summary:
        console.print(f"final accuracy {_fmt(summary.get('final_accuracy'))}, best {_fmt(summary.get('best_accuracy'))}, "
                      f"uplink {_bytes(summary.get('uplink_bytes'))}, simulated {summary.get('sim_seconds', 0):.1f} s")
    return 0


# -- parser -------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fleetlearn", description="Federated learning that survives production.")
    p.add_argument("--version", action="version", version=f"fleetlearn {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser("run", help="run a federated training job (default: digits, 100 clients, 20 rounds)",
                       description="Run a federated training job. With no CONFIG, runs the embedded default: "
                                   "digits, 100 clients, Dirichlet(0.5) label skew, 20 rounds, an MLP.")
    r.add_argument("config", nargs="?", help="a TOML config file (optional)")
    r.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override one config value (repeatable), e.g. --set server.rounds=5")
    r.add_argument("--json", action="store_true", help="print the summary as one JSON object on the last line of stdout")
    r.add_argument("--runs-dir", help="folder for run directories (default: store.root, 'runs')")
    r.add_argument("--quiet", action="store_true", help="no progress bar or summary table")
    r.set_defaults(func=cmd_run)

    ls = sub.add_parser("runs", help="list runs", description="List the runs under a runs folder, newest first.")
    ls.add_argument("--runs-dir", default="runs", help="folder holding run directories (default: runs)")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=cmd_runs)

    sh = sub.add_parser("show", help="show a run's rounds", description="Show a run's configuration summary and a table of its rounds.")
    sh.add_argument("run", help="a run id (under --runs-dir) or a run directory")
    sh.add_argument("--runs-dir", default="runs", help="folder holding run directories (default: runs)")
    sh.add_argument("--json", action="store_true", help="print JSON")
    sh.set_defaults(func=cmd_show)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"fleetlearn: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
