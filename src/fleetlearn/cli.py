"""The `fleetlearn` command: a thin layer over the Python API.

Bad input (config, data, store) prints one short line naming the problem and
exits with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import typing
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from .cli_tables import ColumnError, FitTable, parse_columns
from .config import CLIENT_ATTACK_OPTIONS, RUN_ID_PATTERN, AttackKind, ConfigError, add_config_dir_to_path, load_config
from .records import RoundRecord, RunSummary

EXIT_USAGE = 2
EXIT_RUN_FAILED = 1  # the run went through and every round failed


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


# -- resuming: what --set may change ----------------------------------------------------
# The keys `--resume --set` may change.  None changes what a round computes from the model it
# starts with, nor what the committed rounds were: how long the run goes on, when it is
# evaluated and checkpointed, how many CPU threads it uses, where its metrics are served.
# Every other key is refused (the data partition, the model, the seed, the training and
# aggregation rules, privacy: the resumed run would no longer be the one its checkpoints,
# records and privacy ledger describe).  An accepted change is written to config.toml and
# recorded in the run store with the first round it applies to (`fleetlearn show`).
RESUME_SAFE_KEYS = {
    "server.rounds": "the rounds the run trains in all (not fewer than it committed; refused under a cosine lr schedule, which spans them)",
    "server.eval_every": "how often the global model is evaluated (refused under a plateau lr schedule, which reads the evaluated loss)",
    "store.checkpoint_every": "how often a checkpoint is kept (resuming again needs one at the last committed round)",
    "store.background_commit": "whether a round is committed beside the next round or on its path (committed the same either way)",
    "engine.threads": "the torch threads of the process",
    "engine.aggregation_kernels": "how the median and trimmed mean are computed (the same results, bit for bit)",
    "engine.training_kernels": "how the batched training step runs (the same arithmetic, rounded differently)",
    "monitoring.prometheus_port": "where the Prometheus metrics are served",
    "monitoring.prometheus_host": "where the Prometheus metrics are served",
}

_RESUME_REFUSED_WHY = {
    "seed": "the seed fixed the partition, the cohorts and the clients' randomness of the committed rounds",
    "name": "the run's name is recorded when it is created",
    "data": "the committed rounds were trained on the partition it defines",
    "model": "the committed checkpoints hold the parameters of the model it defines",
    "privacy": "the privacy ledger accounts for the mechanism the committed rounds used",
    "canary": "canary rollouts cannot be resumed",
    "store": "the run's directory and database are where it was created",
    "devices": "the cohorts and the virtual clock of the committed rounds follow the device model",
}


def _lookup(d: dict, key: str):
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def resume_config(store, sets: list[str] | None):
    """The configuration a resumed run trains with: its ``config.toml`` with the `sets`
    (``section.key=value``) that `RESUME_SAFE_KEYS` allows, and the changes they make
    ({key: (old, new)}, unchanged values left out).  A key that may not change is refused
    with a UsageError naming it and why."""
    from .config import parse_override

    path = store.run_dir / "config.toml"
    base = load_config(path)
    if not sets:
        return base, {}
    keys = list(dict.fromkeys(".".join(parse_override(item)[0]) for item in sets))
    cfg = load_config(path, list(sets))
    old, new = base.to_dict(), cfg.to_dict()
    changes = {}
    for key in keys:
        a, b = _lookup(old, key), _lookup(new, key)
        if a == b:
            continue  # the value it has: nothing changes
        if key not in RESUME_SAFE_KEYS:
            why = _RESUME_REFUSED_WHY.get(key) or _RESUME_REFUSED_WHY.get(key.split(".")[0]) or (
                "it changes what the rounds compute, so the resumed run would no longer be the one its checkpoints and records describe")
            raise UsageError(f"--set {key}: cannot change on --resume ({json.dumps(a)} -> {json.dumps(b)}): {why}. "
                             f"Keys that may change on --resume: {', '.join(RESUME_SAFE_KEYS)}")
        changes[key] = (a, b)
    schedules = (cfg.client.lr_schedule, cfg.server.server_lr_schedule)
    if "server.rounds" in changes:
        done = int(store.info()["rounds_done"])
        if cfg.server.rounds < done:
            raise UsageError(f"--set server.rounds={cfg.server.rounds}: run {store.run_id} already committed {done} rounds")
        if "cosine" in schedules:
            raise UsageError("--set server.rounds: cannot change on --resume under a cosine learning-rate schedule "
                             "(client.lr_schedule or server.server_lr_schedule), which spans server.rounds: the rounds left would train at other rates")
    if "server.eval_every" in changes and "plateau" in schedules:
        raise UsageError("--set server.eval_every: cannot change on --resume under a plateau learning-rate schedule, "
                         "which reads the evaluated loss: the rounds left would train at other rates")
    return cfg, changes


# -- fleetlearn run ---------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from .api import build
    from .data import DataError
    from .errors import all_rounds_failed
    from .ops import StoreError

    overrides = list(args.set or [])
    if args.runs_dir:
        overrides.append(f"store.root={json.dumps(args.runs_dir)}")
    if args.store:
        overrides.append(f"store.url={json.dumps(args.store)}")
    done = 0
    store = None
    try:
        console = Console(stderr=args.json)
        if args.resume:
            from .ops import RunStore

            if args.config:
                raise UsageError("give a CONFIG or --resume RUN, not both (a resumed run keeps its own config)")
            # The run's lock, held until this process ends: a second resume of it is refused.
            store = RunStore.open(args.resume, args.runs_dir or "runs", url=args.store, lock=True)
            cfg, changes = resume_config(store, args.set)
            if cfg.canary.set:
                raise UsageError(f"run {store.run_id} is a canary rollout; resuming one is not supported")
            with console.status("loading data and the last committed round..."):
                coordinator = build(cfg, store=store)
                done = coordinator.resume()
            if changes:
                store.record_resume_overrides(changes, done + 1, cfg.to_toml())
        else:
            cfg = load_config(args.config, overrides)
            if args.config:
                add_config_dir_to_path(args.config, cfg)  # appended, and only when the config names an import path
            with console.status("loading data and building the run..."):
                coordinator = build(cfg)  # a CanaryRollout when [canary] names a candidate
    except BaseException as exc:
        if store is not None:
            store.close()  # release the run's lock
        if isinstance(exc, (ConfigError, DataError, StoreError, ValueError)):
            raise UsageError(str(exc)) from None
        raise

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
        task = progress.add_task("train", total=total, completed=done, status=f"resumed after round {done}" if done else "")

        def on_round(rec: RoundRecord) -> None:
            status = f"acc {_fmt(rec.accuracy)}  loss {_fmt(rec.loss)}  up {_bytes(rec.uplink_bytes)}  sim {rec.sim_seconds:.1f}s"
            if rec.status != "ok":
                status += f"  [red]{rec.status}: {rec.reason}"
            progress.update(task, advance=1, status=status)

        try:
            summary = coordinator.run(on_round=on_round)
        except ConfigError as exc:  # a resource named in the config failed when the run started (a port taken since)
            raise UsageError(str(exc)) from None
        except StoreError as exc:  # the store failed mid-run (disk full, read-only, damaged)
            where = coordinator.store.run_dir if coordinator.store is not None else ""
            raise UsageError(f"{exc}; the rounds committed before it are kept (fleetlearn run --resume {where})") from None
        except KeyboardInterrupt:
            if coordinator.store is not None:
                coordinator.store.finish(coordinator.summary(time.perf_counter() - t0).to_json_dict(), status="interrupted")
            console.print("[yellow]interrupted; the rounds so far are in the run store")
            return 130
    if not args.quiet:
        _print_summary(console, summary)
    if args.json:
        print(json.dumps(summary.to_json_dict()), flush=True)
    failed = all_rounds_failed(summary)
    if failed is not None:  # nothing was learned: not a success
        where = f"; the records are in {summary.run_dir}" if summary.run_dir else ""
        print(f"fleetlearn: error: {failed}{where}", file=sys.stderr)
        return EXIT_RUN_FAILED
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
        *([("final F1 (class 1)", _fmt(s.final_f1))] if s.final_f1 == s.final_f1 else []),
        ("final loss", _fmt(s.final_loss)),
        ("uplink", _bytes(s.uplink_bytes)),
        ("downlink", _bytes(s.downlink_bytes)),
        ("compression ratio", _fmt(s.compression_ratio, ".2f") + (f" ({s.uplink_chain})" if s.uplink_chain not in ("", "none") else "")),
        ("simulated time", f"{s.sim_seconds:.1f} s"),
        ("wall time", f"{s.wall_seconds:.2f} s"),
    ]
    if s.personal_accuracy == s.personal_accuracy:  # personalization on: its end-of-run evaluation
        rows.append(("personal / global (local tests)", f"{_fmt(s.personal_accuracy)} / {_fmt(s.personal_global_accuracy)} (gain {s.personal_gain:+.4f})"))
    if s.stopped_reason:
        rows.append(("stopped early", s.stopped_reason))
    if s.dp_epsilon == s.dp_epsilon:  # differential privacy: what the run spent
        rows.append(("privacy spent", _privacy(s.dp_epsilon, s.dp_delta, s.dp_accounting, s.dp_sampling)))
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)


def _privacy(epsilon, delta, accounting: str, sampling: str) -> str:
    """epsilon = 3.61 at delta = 1e-05 (pld, poisson sampling)"""
    eps = "inf" if epsilon in ("inf", float("inf")) else f"{float(epsilon):.4g}"
    how = ", ".join(x for x in (accounting, f"{sampling} sampling" if sampling else "") if x)
    return f"epsilon = {eps} at delta = {float(delta):g}" + (f" ({how})" if how else "")


# -- fleetlearn runs / show ---------------------------------------------------------
def _render(console: Console, table: FitTable, args: argparse.Namespace) -> None:
    """Print a CLI table fitted to the terminal (`--wide`, `--columns` from `args`)."""
    try:
        table.render(console, wide=getattr(args, "wide", False), only=parse_columns(getattr(args, "columns", None)))
    except ColumnError as exc:
        raise UsageError(str(exc)) from None


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
    t = FitTable(f"runs in {args.runs_dir}/", ("run", "name", "status", "created", "rounds", "final accuracy"),
                 priority=("run", "status", "final accuracy", "rounds", "created", "name"))
    for it in items:
        created = it.get("created_at")
        t.add_row(
            it["run_id"], it.get("name") or "", str(it.get("status")),
            created.strftime("%Y-%m-%d %H:%M:%S") if hasattr(created, "strftime") else str(created or ""),
            str(it.get("rounds_done", "")), _fmt(it.get("final_accuracy")),
        )
    _render(console, t, args)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from .ops import RunStore, StoreError

    try:
        store = RunStore.open(args.run, args.runs_dir)
        info = store.info()
        records = store.records()
        overrides = store.resume_overrides()
    except StoreError as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        print(json.dumps({"run": {k: v for k, v in info.items() if k != "config_toml"}, "rounds": [r.to_dict() for r in records],
                          "resume_overrides": overrides}, default=str))
        return 0
    console = Console()
    private = any("dp_epsilon" in r.extra for r in records)
    cols = ["round", "version", "status", "accuracy", "loss", "fed acc", "local acc", "accepted", "dropped", "rejected", "uplink", "downlink", "sim s"]
    t = FitTable(f"run {info['run_id']} ({info['status']})", cols + (["epsilon"] if private else []), justify="right",
                 priority=["round", "status", "accuracy", "accepted", "uplink", *(["epsilon"] if private else []), "loss",
                           "version", "dropped", "rejected", "downlink", "sim s", "fed acc", "local acc"])
    eps = math.nan
    for r in records:
        eps = float(r.extra.get("dp_epsilon", eps))  # cumulative: a round that spent nothing shows the spend so far
        t.add_row(
            str(r.round), str(r.version), r.status, _fmt(r.accuracy), _fmt(r.loss), _fmt(r.fed_accuracy),
            _fmt(r.local_accuracy), f"{r.accepted}/{r.selected}", str(r.dropped), str(r.rejected),
            _bytes(r.uplink_bytes), _bytes(r.downlink_bytes), f"{r.sim_seconds:.2f}", *([_fmt(eps, ".3g")] if private else []),
        )
    _render(console, t, args)
    summary = info.get("summary")
    if summary:
        console.print(f"final accuracy {_fmt(summary.get('final_accuracy'))}, best {_fmt(summary.get('best_accuracy'))}, "
                      f"uplink {_bytes(summary.get('uplink_bytes'))}, simulated {summary.get('sim_seconds', 0):.1f} s")
        if summary.get("dp_epsilon") is not None:
            console.print("privacy spent: " + _privacy(summary["dp_epsilon"], summary.get("dp_delta"), summary.get("dp_accounting", ""), summary.get("dp_sampling", "")))
    elif private:
        last = next(r for r in reversed(records) if "dp_epsilon" in r.extra)
        console.print(f"privacy spent so far: epsilon = {_fmt(float(last.extra['dp_epsilon']), '.4g')} at delta = {last.extra.get('dp_delta')}")
    for o in overrides:
        console.print(f"from round {o['round']} (--resume --set): {o['key']} = {json.dumps(o['new'])} (was {json.dumps(o['old'])})")
    return 0


# -- fleetlearn server / client / certs / token ----------------------------------------
def _standby_endpoint(args: argparse.Namespace, run_id: str):
    """While a standby waits for the lease, its address answers clients "not leading yet,
    retry after" (`transport/grpc/standby.py`): they keep their backoff short and reach it
    moments after it takes over."""
    from .transport.grpc.certs import ServerTls
    from .transport.grpc.standby import StandbyEndpoint

    tls = ServerTls.from_dir(args.certs, mutual=args.mtls) if args.certs else None
    retry = min(0.5, max(0.05, args.lease_ttl / 10))  # the standby's own poll for the lease
    try:
        return StandbyEndpoint(args.listen, tls, retry, f"standby for run {run_id}: not leading yet; retry or use the leader").start()
    except (OSError, RuntimeError, ValueError) as exc:
        raise UsageError(f"--listen {args.listen}: cannot listen while standing by: {exc}") from None


def _standby_metrics(mon):
    """While a standby waits for the leader lease: the run's /metrics endpoint (when it has
    one) reporting ``fleetlearn_leader 0``, so that "no leader" and "a standby is up" are
    told apart.  Returns the exporter to stop before the run's own one starts, or None."""
    if mon.prometheus_port is None:
        return None
    from .monitoring.parts import start_exporter
    from .monitoring.prometheus import PrometheusExporter

    exporter = PrometheusExporter()
    start_exporter(exporter, mon.prometheus_port, mon.prometheus_host)  # a ConfigError: cmd_server's usage error
    exporter.set_leader(False)
    return exporter


def _join_named_run(args: argparse.Namespace, console: Console) -> None:
    """`fleetlearn server CONFIG --run-id NAME [--standby]`: when run NAME exists (under
    --runs-dir, else the config's store.root), continue it as `--resume NAME` would, as a
    standby when another server leads it now; with --standby, first wait for its leader to
    start it (the run directory and its first lease).  A new run is started as NAME
    (store.run_id).  The servers of one run share the runs folder (a volume) and the store."""
    from .ops import RunStore, StoreError
    from .ops.lease import lease_holder_id

    add_config_dir_to_path(args.config)
    root = Path(args.runs_dir or load_config(args.config, list(args.set or [])).store.root)
    args.runs_dir = str(root)
    run_dir = root / args.run_id
    if args.standby:
        console.print(f"fleetlearn server: standby for run {args.run_id}: waiting for its leader to start it in {root}")
        while True:
            if (run_dir / "config.toml").is_file():
                try:
                    store = RunStore.open(run_dir, root, url=args.store)
                    led = store.lease_row() is not None  # the leader took its first lease: the run is up
                    store.close()
                    if led:
                        break
                except StoreError:
                    pass  # created a moment ago: its database rows are not written yet
            time.sleep(min(0.5, max(0.05, args.lease_ttl / 10)))
    if (run_dir / "config.toml").is_file():
        args.resume = str(run_dir)
        args.run_id = None  # the run's own config names it; --set may change only the resume-safe keys
        if not args.standby:
            # A server restarted after its standby took over (or a second replica) joins as a standby.
            try:
                store = RunStore.open(run_dir, root, url=args.store)
                row = store.lease_row()
                store.close()
            except StoreError:
                row = None  # the resume below reports what is wrong with the run
            if row is not None and row["live"] and row["holder"] != lease_holder_id(args.listen):
                console.print(f"fleetlearn server: run {run_dir.name} is led by {row['holder']!r}: standing by for its lease")
                args.standby = True


def cmd_server(args: argparse.Namespace) -> int:
    """Drive a real fleet over gRPC with the same Coordinator as the simulation (a
    CanaryRollout of two of them when ``[canary] set`` names a candidate)."""
    from .data import DataError
    from .engine import build_run
    from .ops import RunStore, StoreError
    from .transport.grpc.commands import server_transport
    from .transport.grpc.server import Limits

    if not (math.isfinite(args.heartbeat_s) and args.heartbeat_s > 0):
        raise UsageError(f"--heartbeat-s {args.heartbeat_s}: allowed: a number of seconds > 0")
    if not (math.isfinite(args.lease_ttl) and args.lease_ttl > 0):
        raise UsageError(f"--lease-ttl {args.lease_ttl}: allowed: a number of seconds > 0")
    if args.run_id is not None:
        if args.resume:
            raise UsageError("--run-id NAME starts or joins run NAME, --resume RUN continues one: give one of them")
        if not args.config:
            raise UsageError("--run-id needs the CONFIG a new run NAME starts from")
        if not re.fullmatch(RUN_ID_PATTERN, args.run_id):
            raise UsageError(f"--run-id {args.run_id!r}: allowed: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    if args.standby and not (args.resume or args.run_id):
        raise UsageError("--standby needs --resume RUN (or --run-id NAME): a standby waits to take over an existing run")
    from .ops.lease import LeaseKeeper, lease_holder_id, wait_for_lease

    holder_id = lease_holder_id(args.listen)
    console = Console(stderr=True)
    endpoint = None  # a standby's waiting endpoint, up until the run's own server takes the address
    try:
        changes: dict = {}
        if args.run_id is not None:
            _join_named_run(args, console)  # sets args.resume (and args.runs_dir) when run NAME exists
        if args.resume:
            store = RunStore.open(args.resume, args.runs_dir or "runs", url=args.store)
            if args.standby:
                # The lease replaces the run directory's flock here: a deposed leader that is still
                # alive (partitioned from the database) may hold the flock, and it is fenced anyway.
                console.print(f"fleetlearn server: standby {holder_id} for run {store.run_id}: waiting for the leader lease")
                # The config as it stands now, for the waiting endpoint; read again once leading (the
                # leader may record `--resume --set` overrides while this one waits).
                waiting = _standby_metrics(resume_config(store, args.set)[0].monitoring)
                endpoint = _standby_endpoint(args, store.run_id)
                try:
                    token = wait_for_lease(store, holder_id, args.lease_ttl, takeover_only=True)
                except BaseException:
                    endpoint.stop()
                    raise
                finally:
                    if waiting is not None:
                        waiting.stop()  # the run's own exporter takes the port when the run starts
                # The endpoint goes on answering "retry after" while the run is built (seconds: its
                # data, model and checkpoint); `make_transport` frees the address just before the
                # run's server binds it.  Stopped here, clients met a closed port for those seconds
                # and fell back to their exponential backoff (~2.5 s more to the first round).
                console.print(f"fleetlearn server: {holder_id} took the leader lease of run {store.run_id} (fencing token {token})")
                store.sweep()  # what the dead leader left; its late writes are fenced
            cfg, changes = resume_config(store, args.set)
            if cfg.canary.set:  # as `fleetlearn run --resume`; refused whether or not the run is in use
                raise UsageError(f"run {store.run_id} is a canary rollout; resuming one is not supported")
            if not args.standby:
                store.lock()  # held until exit: a second resume of the run is refused
                # A leader killed a moment ago still holds its lease until it expires: wait that long.
                if wait_for_lease(store, holder_id, args.lease_ttl, timeout=args.lease_ttl + 2) is None:
                    row = store.lease_row() or {}
                    raise UsageError(f"run {store.run_id} is led by {row.get('holder')!r} (leader lease, fencing token "
                                     f"{row.get('token')}); start this server with --standby to take over when it stops")
        else:
            if not args.config:
                raise UsageError("give a CONFIG, or --resume RUN")
            add_config_dir_to_path(args.config)
            overrides = list(args.set or []) + ["store.checkpoint_every=1"]  # every round is resumable
            if args.run_id is not None:
                overrides.append(f"store.run_id={json.dumps(args.run_id)}")
            if args.runs_dir:
                overrides.append(f"store.root={json.dumps(args.runs_dir)}")
            if args.store:
                overrides.append(f"store.url={json.dumps(args.store)}")
            cfg = load_config(args.config, overrides)
            store = True

        holder: dict = {}

        def make_transport(learner, device):
            nonlocal endpoint
            if endpoint is not None:
                endpoint.stop()
                endpoint = None
            t = server_transport(cfg, learner.spec, address=args.listen, state_dir=args.state, cert_dir=args.certs,
                                 mutual_tls=args.mtls, max_round_s=args.max_round_s, insecure=args.insecure,
                                 heartbeat_interval_s=args.heartbeat_s,
                                 limits=Limits(upload_idle_s=args.upload_idle_s), learner=learner)
            holder["t"] = t
            return t

        # A Coordinator, or a CanaryRollout whose two arms share this one transport
        # (commands.check_canary: the candidate keeps what clients agreed to at registration).
        coordinator = build_run(cfg, store=store, transport_factory=make_transport)
    except (ConfigError, DataError, StoreError, OSError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    finally:
        if endpoint is not None:  # the run was not built (or built no transport): free the address
            endpoint.stop()
            endpoint = None
    transport = holder["t"]
    run_store = coordinator.store
    keeper = None
    if run_store is not None:
        # Every server leads its run under the lease: a standby (--standby) takes over when this
        # process dies or loses the database, and every commit checks the fencing token.
        try:
            if run_store.lease is None and run_store.acquire_lease(holder_id, args.lease_ttl) is None:
                row = run_store.lease_row() or {}
                transport.close()
                raise UsageError(f"run {run_store.run_id} is led by {row.get('holder')!r} (leader lease, fencing token "
                                 f"{row.get('token')}); start this server with --standby to take over when it stops")
        except StoreError as exc:
            transport.close()
            raise UsageError(str(exc)) from None

        def lost() -> None:
            exporter = getattr(getattr(coordinator, "monitoring", None), "exporter", None)
            if exporter is not None:
                exporter.set_leader(False)
            console.print(f"fleetlearn server: {holder_id} lost the leader lease of run {run_store.run_id}; "
                          "its next commit is refused (a standby leads now)")

        keeper = LeaseKeeper(run_store, on_lost=lost).start()
    try:
        done = coordinator.resume() if args.resume else 0
        if changes:
            coordinator.store.record_resume_overrides(changes, done + 1, cfg.to_toml())
    except (StoreError, ValueError) as exc:
        transport.close()
        if keeper is not None:
            keeper.stop()
        raise UsageError(str(exc)) from None
    coordinator.wait_for_clients = (args.min_clients, args.wait_s)
    run = coordinator.store.run_id if coordinator.store else ""
    console.print(f"fleetlearn server on {args.listen} ({'TLS' if args.certs else 'plaintext'}), run {run}"
                  + (f", resuming after round {done}" if done else ""))

    def on_round(rec: RoundRecord) -> None:
        console.print(f"round {rec.round}: {rec.status} acc {_fmt(rec.accuracy)} accepted {rec.accepted}/{rec.selected}"
                      f" refused {sum((rec.extra.get('refusals') or {}).values())} wall {rec.wall_seconds:.2f}s")
        decision = (rec.extra.get("canary") or {}).get("decision")
        if decision:
            console.print(f"canary: {decision['decision']} after round {decision['round']}: {decision['reason']}")

    try:
        summary = coordinator.run(on_round=on_round)
        transport.finish()
    except StoreError as exc:  # e.g. the lease was lost: a deposed leader's commit is refused
        raise UsageError(f"{exc}; the rounds committed before it are kept") from None
    finally:
        transport.close()
        if keeper is not None:
            keeper.stop()  # releases the lease: a standby takes over at once
    if args.json:
        print(json.dumps(summary.to_json_dict()), flush=True)
    else:
        _print_summary(console, summary)
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    import os

    from .transport.grpc.client import ClientRefused
    from .transport.grpc.commands import client

    token = args.token or os.environ.get("FLEETLEARN_TOKEN")
    if not token:
        raise UsageError("give --token TOKEN or set FLEETLEARN_TOKEN")
    if args.probe and (args.client_index is not None or args.data is not None):
        raise UsageError("--probe trains on the probes' known synthetic data: give neither --client-index nor --data")
    if not args.probe and (args.client_index is None) == (args.data is None):
        raise UsageError("give exactly one of --client-index I or --data pkg.module:function (or --probe)")
    try:
        if args.config:
            add_config_dir_to_path(args.config)
        report = client(args.server, token, args.config, client_index=args.client_index, data_fn=args.data,
                        num_classes=args.num_classes, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
                        tls_server_name=args.tls_server_name, name=args.name or "", max_rounds=args.max_rounds,
                        give_up_after_s=args.give_up_after, uplink_limit_mbps=args.uplink_limit_mbps, probe=args.probe,
                        memory_mb=args.memory_mb, attack=args.attack,
                        attack_options={k: getattr(args, f"attack_{k}") for k in CLIENT_ATTACK_OPTIONS}, own_process=True)
    except (ClientRefused, ConfigError, ValueError, OSError) as exc:
        raise UsageError(str(exc)) from None
    print(json.dumps({k: v for k, v in vars(report).items() if isinstance(v, (int, float, str, bool, type(None), list))}, default=str))
    if report.stopped.startswith("gave_up"):
        # the last error says which: refused connections, a name that does not resolve, ...
        print(f"fleetlearn: error: gave up: the server at {args.server} could not be reached: "
              f"{report.stopped.removeprefix('gave_up: ')}", file=sys.stderr)
        return 1
    return 0


def cmd_aggregator(args: argparse.Namespace) -> int:
    """Serve one region's clients and forward one weighted sum per round to the root."""
    import logging
    import os

    from .data import DataError
    from .engine.aggregator import build_aggregator, run_aggregator
    from .transport.grpc.client import ClientRefused
    from .transport.grpc.commands import _client_tls

    token = args.token or os.environ.get("FLEETLEARN_TOKEN")
    if not token:
        raise UsageError("give --token TOKEN (this aggregator's token at the root, from `fleetlearn token add` there) "
                         "or set FLEETLEARN_TOKEN")
    for flag, value in (("--heartbeat-s", args.heartbeat_s), ("--wait-s", args.wait_s), ("--max-round-s", args.max_round_s)):
        if not (math.isfinite(value) and value > 0):
            raise UsageError(f"{flag} {value}: allowed: a number of seconds > 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        add_config_dir_to_path(args.config)
        cfg = load_config(args.config, list(args.set or []))
        aggregator, transport = build_aggregator(
            cfg, args.region, address=args.listen, state_dir=args.state, cert_dir=args.certs, mutual_tls=args.mtls,
            insecure=args.insecure, heartbeat_interval_s=args.heartbeat_s, max_round_s=args.max_round_s,
            min_clients=args.min_clients, wait_s=args.wait_s)
    except (ConfigError, DataError, OSError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    print(f"fleetlearn aggregator: region {args.region} on {transport.address} ({'TLS' if args.certs else 'plaintext'}), "
          f"root {args.root}", file=sys.stderr, flush=True)
    try:
        report = run_aggregator(aggregator, args.root, token, tls=_client_tls(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name),
                                name=args.name or "", give_up_after_s=args.give_up_after)
    except (ClientRefused, ValueError) as exc:
        raise UsageError(str(exc)) from None
    finally:
        transport.close()
    print(json.dumps({"region": args.region, "stopped": report.stopped, "rounds": report.rounds, "retries": report.retries,
                      "region_rounds": aggregator.rounds}, default=str))
    if report.stopped.startswith("gave_up"):
        print(f"fleetlearn: error: gave up: the root at {args.root} could not be reached: {report.stopped.removeprefix('gave_up: ')}",
              file=sys.stderr)
        return 1
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from .transport.grpc.certs import certs

    try:
        paths = certs(args.out, args.host or ("127.0.0.1", "localhost"), args.client or ("client",), args.days, args.force)
    except FileExistsError as exc:
        raise UsageError(f"{exc}; use --force to overwrite") from None
    print(f"certificates written to {args.out}: " + ", ".join(str(p) for p in vars(paths).values() if p))
    hosts = list(args.host or ("127.0.0.1", "localhost"))
    print(f"the server certificate is valid for {', '.join(hosts)} only: clients must dial one of these"
          + ("" if args.host else " (this machine); for a server other hosts reach, pass --host NAME (repeatable)"))
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from .transport.grpc.auth import TokenError, token_add, token_list, token_revoke

    try:
        if args.action == "add":
            if not args.name:
                raise UsageError("token add needs a NAME")
            print(token_add(args.state, args.name, args.rotate))
        elif args.action == "revoke":
            if not args.name:
                raise UsageError("token revoke needs a NAME")
            if not token_revoke(args.state, args.name):
                raise UsageError(f"no token named {args.name!r}")
            print(f"revoked {args.name}")
        else:
            for info in token_list(args.state):
                print(json.dumps({k: v for k, v in vars(info).items()}, default=str))
    except TokenError as exc:
        raise UsageError(str(exc)) from None
    return 0


# -- fleetlearn report / dashboard ----------------------------------------------------
def _run_dir(run: str, runs_dir: str) -> Path:
    from .ops import RunStore, StoreError

    try:
        return RunStore.open(run, runs_dir).run_dir
    except StoreError as exc:
        raise UsageError(str(exc)) from None


def cmd_report(args: argparse.Namespace) -> int:
    from .monitoring import write_report
    from .ops import StoreError

    run_dir = _run_dir(args.run, args.runs_dir)
    out = Path(args.out) if args.out else run_dir / "report"
    try:
        path = write_report(run_dir, out)
    except StoreError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        hint = "" if args.out else " (a read-only run: write the report elsewhere with --out DIR)"
        raise UsageError(f"cannot write the report to {out}: {exc.strerror or exc}: {exc.filename or out}{hint}") from None
    print(path)
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from .monitoring import serve_dashboard

    srv = serve_dashboard(_run_dir(args.run, args.runs_dir), host=args.host, port=args.port)
    print(f"dashboard at {srv.url} (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        srv.stop()
    return 0


# -- fleetlearn models ------------------------------------------------------------------
def _registry(args: argparse.Namespace):
    from .ops import ModelRegistry, RunStore, StoreError

    try:
        return ModelRegistry(RunStore.open(args.run, args.runs_dir))
    except StoreError as exc:
        raise UsageError(str(exc)) from None


def cmd_models(args: argparse.Namespace) -> int:
    from .ops import StoreError

    reg = _registry(args)
    try:
        if args.action == "list":
            versions = reg.versions()
            if args.json:
                print(json.dumps([v.to_dict() for v in versions], default=str))
                return 0
            t = FitTable(f"model versions of run {reg.run_id}",
                         ("version", "parent", "round", "arm", "status", "config", "accuracy", "loss", "checkpoint", "tags"),
                         priority=("version", "status", "tags", "accuracy", "round", "arm", "parent", "loss", "checkpoint", "config"))
            for v in versions:
                t.add_row(str(v.version), str(v.parent_version), str(v.round), v.arm, v.status, v.config_hash,
                          _fmt(v.accuracy), _fmt(v.loss), "yes" if v.has_checkpoint else "-", ", ".join(v.tags))
            _render(Console(), t, args)
        elif args.action == "show":
            v = reg.get(_version_arg(args, required=True))
            d = v.to_dict()
            d["lineage"] = reg.lineage(v.version)
            d["tag_history"] = [{k: h[k] for k in ("tag", "reason", "created_at", "removed_at")} for h in reg.tag_history() if h["version"] == v.version]
            print(json.dumps(d, default=str, indent=None if args.json else 1))
        elif args.action == "promote":
            version = _version_arg(args, required=True)
            before = reg.promote(version, args.reason or "promoted from the command line")
            print(f"version {version} is production" + (f" (was version {before})" if before is not None and before != version else ""))
        elif args.action == "rollback":
            if args.to is not None:
                args.version = args.to
            frm, to = reg.rollback(_version_arg(args, required=False), args.reason or "rolled back from the command line")
            print(f"version {frm} rolled back; version {to} is production")
        elif args.action == "export":
            if not args.out:
                raise UsageError("models export needs --out FILE.safetensors")
            path = reg.export(_version_arg(args, required=False), args.out)
            print(path)
    except StoreError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"{exc.filename or args.out}: {exc.strerror or exc}") from None
    return 0


def _version_arg(args: argparse.Namespace, required: bool) -> int | None:
    if args.version is None:
        if required:
            raise UsageError(f"models {args.action} needs a VERSION")
        return None
    try:
        return int(args.version)
    except ValueError:
        raise UsageError(f"VERSION must be an integer, got {args.version!r}") from None


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
    r.add_argument("--resume", metavar="RUN", help="continue a run (id under --runs-dir, or its directory) from its last committed round; "
                   "one process at a time (a second is refused). With --resume, --set may change only " + ", ".join(RESUME_SAFE_KEYS)
                   + "; each change is recorded in config.toml and the run store (fleetlearn show)")
    r.add_argument("--store", metavar="URL", help="the run store's database as an SQLAlchemy URL, e.g. postgresql://user@host/db (default: SQLite in the run directory)")
    r.set_defaults(func=cmd_run)

    ls = sub.add_parser("runs", help="list runs", description="List the runs under a runs folder, newest first.")
    ls.add_argument("--runs-dir", default="runs", help="folder holding run directories (default: runs)")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.add_argument("--wide", action="store_true", help="show every column, however wide (by default the columns that fit the terminal)")
    ls.add_argument("--columns", metavar="A,B,...", help="show these columns only, comma-separated")
    ls.set_defaults(func=cmd_runs)

    sh = sub.add_parser("show", help="show a run's rounds", description="Show a run's configuration summary and a table of its rounds.")
    sh.add_argument("run", help="a run id (under --runs-dir) or a run directory")
    sh.add_argument("--runs-dir", default="runs", help="folder holding run directories (default: runs)")
    sh.add_argument("--json", action="store_true", help="print JSON")
    sh.add_argument("--wide", action="store_true", help="show every column, however wide (by default the columns that fit the terminal)")
    sh.add_argument("--columns", metavar="A,B,...", help="show these columns only, comma-separated")
    sh.set_defaults(func=cmd_show)
    sv = sub.add_parser("server", help="serve a run to real clients over gRPC",
                        description="Run the Coordinator against real clients over gRPC (TLS and per-client tokens). "
                                    "Every round is committed before the next starts; --resume continues after a crash.")
    sv.add_argument("config", nargs="?", help="the run's TOML config")
    sv.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override one config value (repeatable)")
    sv.add_argument("--listen", default="127.0.0.1:7777", help="address to listen on (default 127.0.0.1:7777)")
    sv.add_argument("--state", default="fleetlearn-state", help="where the client tokens are: a folder (its tokens.db; default fleetlearn-state) or a database URL "
                    "(postgresql://...: the run store's database, shared by a leader, its standbys and `fleetlearn token`)")
    sv.add_argument("--certs", help="folder with server.pem/server.key (and ca.pem for --mtls) from `fleetlearn certs`")
    sv.add_argument("--mtls", action="store_true", help="require client certificates too")
    sv.add_argument("--insecure", action="store_true", help="serve plaintext (no --certs) on a non-loopback address anyway; "
                    "without it such a server is refused, since tokens and models would cross the network in clear")
    sv.add_argument("--upload-idle-s", type=float, default=60.0, help="drop a client from its round when its upload sends "
                    "no chunk for this long (default 60; a chunk is 1 MiB)")
    sv.add_argument("--min-clients", type=int, default=1, help="wait for this many connected clients before each round")
    sv.add_argument("--wait-s", type=float, default=60.0, help="how long to wait for them (default 60)")
    sv.add_argument("--max-round-s", type=float, default=600.0, help="a round without deadline ends after this (default 600)")
    sv.add_argument("--heartbeat-s", type=float, default=5.0, help="the heartbeat interval clients are told; a selected client "
                    "silent for three intervals is dropped from its round (and from its SecAgg stage) (default 5)")
    sv.add_argument("--resume", metavar="RUN", help="continue a run (id or directory) from its last committed round; --set may then "
                    "change only " + ", ".join(RESUME_SAFE_KEYS) + " (recorded in config.toml and the run store)")
    sv.add_argument("--standby", action="store_true", help="with --resume RUN (or --run-id NAME): wait for the run's leader lease (held by "
                    "the serving process on a shared store such as PostgreSQL), then resume from the last committed round "
                    "and serve; the lease replaces the run directory's lock")
    sv.add_argument("--run-id", metavar="NAME", help="the run's id (store.run_id): with CONFIG, start run NAME, or resume it "
                    "when it exists already (standing by while another server leads it); with --standby, wait for run NAME "
                    "to be started by its leader, then stand by for its lease (so a leader and its standbys can be started "
                    "and restarted with the same command, e.g. by compose or Kubernetes)")
    sv.add_argument("--lease-ttl", type=float, default=10.0, help="the leader lease's lifetime in seconds, renewed every "
                    "third of it; a standby takes over at most this long after the leader dies (default 10)")
    sv.add_argument("--runs-dir", help="folder for run directories (default: store.root)")
    sv.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    sv.add_argument("--store", metavar="URL", help="the run store's database as an SQLAlchemy URL, e.g. postgresql://user@host/db (default: SQLite in the run directory); with --resume it overrides the URL the run recorded)")
    sv.set_defaults(func=cmd_server)

    cl = sub.add_parser("client", help="join a run as a client", description="Join a fleetlearn server as a client: "
                        "register, pull tasks, train locally with the run's model, push updates; reconnects with backoff.")
    cl.add_argument("--server", required=True, help="HOST:PORT of the server, or several separated by commas (a leader and its "
                    "standbys, `fleetlearn server --standby`): an unreachable one fails over to the next, with backoff")
    cl.add_argument("--token", help="this client's token (or set FLEETLEARN_TOKEN)")
    cl.add_argument("--config", required=True, help="the run's TOML config (model and, with --client-index, data)")
    cl.add_argument("--client-index", type=int, help="use partition slot I of the config's dataset as local data")
    cl.add_argument("--data", help="local data from an import path pkg.module:function -> (x, y, x_test, y_test)")
    cl.add_argument("--num-classes", type=int, help="number of classes (with --data)")
    cl.add_argument("--probe", action="store_true", help="a probe client: train on known synthetic data the server can "
                    "predict, so it checks this device's updates after the wire (never aggregated); alerts when one is off")
    cl.add_argument("--tls-ca", help="CA certificate to trust (TLS)")
    cl.add_argument("--tls-cert", help="client certificate (mutual TLS)")
    cl.add_argument("--tls-key", help="client key (mutual TLS)")
    cl.add_argument("--tls-server-name", help="expected server name in its certificate")
    cl.add_argument("--name", help="a display name")
    cl.add_argument("--max-rounds", type=int, help="stop after this many rounds")
    cl.add_argument("--give-up-after", type=float, help="stop if the server is unreachable this long (seconds)")
    cl.add_argument("--uplink-limit-mbps", type=float, help="send updates no faster than this (Mbit/s); "
                    "the server measures each client's rate and picks adaptive-compression rungs from it")
    cl.add_argument("--memory-mb", type=int, help="memory this device declares for training, in MiB (default: the machine's "
                    "available memory); a HeteroFL run (model.widths, or model.lora_ranks) assigns the client's model width (LoRA rank) from it")
    cl.add_argument("--attack", default="none", metavar="KIND",
                    help="red-team drill: this client attacks as a simulated attacker of [attack] kind KIND would, "
                    "with its own update only (" + ", ".join(k for k in typing.get_args(AttackKind) if k != "none") + "; alie needs --attack-alie-z: colluding "
                    "attacks need the other attackers' updates and run in the simulation only)")
    for key, kinds in CLIENT_ATTACK_OPTIONS.items():
        cl.add_argument("--attack-" + key.replace("_", "-"), dest=f"attack_{key}", type=int if key == "start_round" else float,
                        metavar="N" if key == "start_round" else "X",
                        help=f"[attack] {key} of the red-team client" + (f" ({', '.join(kinds)})" if kinds else " (default 1)"))
    cl.set_defaults(func=cmd_client)

    ag = sub.add_parser("aggregator", help="serve one region's clients and forward their sum to the root",
                        description="A regional aggregator (engine.region_aggregators = true): serves the clients of one region "
                        "(client id mod engine.regions) with the same gRPC service as `fleetlearn server`, pre-aggregates their "
                        "accepted updates into one weighted sum per round and forwards it to the root over gRPC with its own token.")
    ag.add_argument("config", help="the run's TOML config (the root's)")
    ag.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override one config value (repeatable)")
    ag.add_argument("--region", type=int, required=True, help="the region served: 0 to engine.regions - 1 (its clients are "
                    "those whose id mod engine.regions is this)")
    ag.add_argument("--root", required=True, help="HOST:PORT of the root (`fleetlearn server` with engine.region_aggregators = true); "
                    "several, comma-separated, for a root with standbys (tried in turn, as a client's --server)")
    ag.add_argument("--token", help="this aggregator's token at the root (or set FLEETLEARN_TOKEN)")
    ag.add_argument("--listen", default="127.0.0.1:7778", help="address its clients dial (default 127.0.0.1:7778)")
    ag.add_argument("--state", default="fleetlearn-state", help="folder with the clients' token store (default fleetlearn-state)")
    ag.add_argument("--certs", help="folder with server.pem/server.key for its clients (and ca.pem for --mtls)")
    ag.add_argument("--mtls", action="store_true", help="require client certificates from its clients")
    ag.add_argument("--insecure", action="store_true", help="serve its clients plaintext on a non-loopback address anyway")
    ag.add_argument("--tls-ca", help="CA certificate to trust for the root (TLS)")
    ag.add_argument("--tls-cert", help="client certificate at the root (mutual TLS)")
    ag.add_argument("--tls-key", help="client key at the root (mutual TLS)")
    ag.add_argument("--tls-server-name", help="expected name in the root's certificate")
    ag.add_argument("--name", help="a display name at the root (default region-R)")
    ag.add_argument("--min-clients", type=int, default=1, help="wait for this many of its clients before dispatching a round (default 1)")
    ag.add_argument("--wait-s", type=float, default=60.0, help="how long to wait for them, within the round's deadline (default 60)")
    ag.add_argument("--max-round-s", type=float, default=600.0, help="a round without deadline ends after this (default 600)")
    ag.add_argument("--heartbeat-s", type=float, default=5.0, help="the heartbeat interval its clients are told (default 5)")
    ag.add_argument("--give-up-after", type=float, help="stop if the root is unreachable this long (seconds)")
    ag.set_defaults(func=cmd_aggregator)

    ce = sub.add_parser("certs", help="create a CA and TLS certificates", description="Create a CA and server/client certificates for TLS.")
    ce.add_argument("--out", default="certs", help="output folder (default certs)")
    ce.add_argument("--host", action="append", help="a host name or IP address clients dial the server by (repeatable; "
                    "default 127.0.0.1 and localhost only, so give the server's name for clients on other hosts)")
    ce.add_argument("--client", action="append", help="client certificate name (repeatable; default client)")
    ce.add_argument("--days", type=int, default=365, help="validity in days")
    ce.add_argument("--force", action="store_true", help="overwrite existing files")
    ce.set_defaults(func=cmd_certs)

    tk = sub.add_parser("token", help="issue, revoke and list client tokens", description="Per-client tokens, stored hashed.")
    tk.add_argument("action", choices=["add", "revoke", "list"])
    tk.add_argument("name", nargs="?", help="the client's name")
    tk.add_argument("--state", default="fleetlearn-state", help="where the client tokens are: a folder (its tokens.db; default fleetlearn-state) or a database URL "
                    "(postgresql://...: the run store's database, shared by a leader, its standbys and `fleetlearn token`)")
    tk.add_argument("--rotate", action="store_true", help="replace an existing token of that name")
    tk.set_defaults(func=cmd_token)

    rp = sub.add_parser("report", help="write an HTML report with PNG plots", description="Write RUN_DIR/report/report.html with PNG plots.")
    rp.add_argument("run", help="a run id (under --runs-dir) or a run directory")
    rp.add_argument("--runs-dir", default="runs")
    rp.add_argument("--out", metavar="DIR", help="folder to write the report to (default: RUN_DIR/report; give one for a read-only run)")
    rp.set_defaults(func=cmd_report)

    md = sub.add_parser("models", help="the model registry: list, show, promote, roll back, export versions",
                        description="A run's model versions with their lineage and tags (candidate, canary, production, "
                                    "rolled_back). promote tags a version production; rollback gives production back to the "
                                    "version that held it before (or --to VERSION); export writes a safetensors file.")
    md.add_argument("action", choices=["list", "show", "promote", "rollback", "export"])
    md.add_argument("run", help="a run id (under --runs-dir) or a run directory")
    md.add_argument("version", nargs="?", help="a model version (show, promote; export: default production, else the latest)")
    md.add_argument("--to", dest="to", help="rollback: the version to make production (default: the previous production version)")
    md.add_argument("--out", help="export: the .safetensors file to write")
    md.add_argument("--reason", help="why (kept in the tag history)")
    md.add_argument("--runs-dir", default="runs", help="folder holding run directories (default: runs)")
    md.add_argument("--json", action="store_true", help="print JSON")
    md.add_argument("--wide", action="store_true", help="show every column, however wide (by default the columns that fit the terminal)")
    md.add_argument("--columns", metavar="A,B,...", help="show these columns only, comma-separated")
    md.set_defaults(func=cmd_models)

    db = sub.add_parser("dashboard", help="serve a run's dashboard", description="Serve a web dashboard of a run on 127.0.0.1.")
    db.add_argument("run", help="a run id (under --runs-dir) or a run directory")
    db.add_argument("--runs-dir", default="runs")
    db.add_argument("--host", default="127.0.0.1")
    db.add_argument("--port", type=int, default=8050)
    db.set_defaults(func=cmd_dashboard)
    return p


def _old_key_notes_on_one_line() -> None:
    """An old config key read (config.OldKeyNote) is printed as one line naming the new key."""
    import warnings

    from .config import OldKeyNote

    shown = warnings.showwarning
    if getattr(shown, "old_key_notes", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, OldKeyNote):
            print(f"fleetlearn: note: {message}", file=sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    show.old_key_notes = True
    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    _old_key_notes_on_one_line()
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"fleetlearn: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
