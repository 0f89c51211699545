"""Load on the gRPC server: N concurrent clients on 127.0.0.1, full rounds.

    python benchmarks/grpc_load.py                        # N = 100 and 1000, 10 rounds each
    python benchmarks/grpc_load.py --clients 1000 --rounds 5 --dim 100000
    python benchmarks/grpc_load.py --clients 100 --train  # clients really train a logistic model

The server (`GrpcTransport`, plaintext, token auth) runs in this process and
does a round's server-side work: publish the task to the whole population,
collect every update as it streams in, decode it with the uplink codec and
average (a FedAvg step).  The clients are `FleetClient` coroutines, spread over
`--procs` processes (each its own asyncio loop); by default every client has
its own TCP connection (`grpc.use_local_subchannel_pool`), as a fleet of
devices would.  By default a client's "training" is a seeded random delta of
the model's size, so the numbers measure the transport and the server, not
local SGD; `--train` runs the same TorchLearner code as the simulation.

Reported, for the server process only (clients live in other processes):
rounds per minute, round latency p50/p99 (dispatch -> last update), server CPU
seconds per round (user + system, `resource.getrusage`), peak RSS (VmHWM), and
RSS before and after the N clients connected (the per-connection cost).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from fleetlearn.compression import parse_chain
from fleetlearn.learners import ClientData, TorchLearner, logistic
from fleetlearn.learners.base import FitResult, SingleClientLearner
from fleetlearn.messages import Task, Update
from fleetlearn.params import ParamSpec
from fleetlearn.transport.grpc import Backoff, FleetClient, GrpcTransport, TokenStore

FEATURES, CLASSES = 64, 10


def proc_status(field: str) -> float:
    """A memory field of /proc/self/status in MiB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class SyntheticLearner(SingleClientLearner):
    """A learner whose 'training' is a seeded random delta: isolates transport cost."""

    def __init__(self, dim: int):
        self.spec = ParamSpec(("w",), ((dim,),))

    def init_params(self, seed: int) -> torch.Tensor:
        return torch.from_numpy(np.random.default_rng(seed).standard_normal(self.spec.dim, dtype=np.float32) * 0.1)

    def fit(self, params, data, hp, seed, correction=None, max_steps=None):
        delta = torch.from_numpy(np.random.default_rng(seed).standard_normal(params.shape[0], dtype=np.float32) * 1e-3)
        return FitResult(delta=delta, num_examples=data.num_examples, loss_before=1.0, loss_after=0.9, accuracy=0.5,
                         steps=1, samples=data.num_examples, compute_seconds=0.0)


def make_learner(train: bool, dim: int):
    if train:
        return TorchLearner(lambda: logistic(FEATURES, CLASSES), vectorize=False)
    return SyntheticLearner(dim)


def client_data(i: int) -> ClientData:
    g = torch.Generator().manual_seed(i)
    x = torch.randn(20, FEATURES, generator=g)
    y = torch.randint(0, CLASSES, (20,), generator=g)
    return ClientData(x[:16], y[:16], x[16:], y[16:])


def client_process(address: str, tokens: list[str], offset: int, train: bool, dim: int, shared_connection: bool, heartbeat_s: float) -> None:
    raise_fd_limit()
    torch.set_num_threads(1)
    learner = make_learner(train, dim)
    options = [] if shared_connection else [("grpc.use_local_subchannel_pool", 1)]

    async def main() -> None:
        clients = [
            FleetClient(address, tok, learner, client_data(offset + i), name=f"c{offset + i}", backoff=Backoff(0.2, 5.0),
                        give_up_after_s=120, train_in_thread=train, channel_options=options, seed=offset + i,
                        device={"compute_sps": 1000.0, "uplink_mbps": 10.0, "downlink_mbps": 50.0})
            for i, tok in enumerate(tokens)
        ]
        # Connect gradually, as a fleet would come online, not in one SYN flood.
        tasks = []
        for c in clients:
            tasks.append(asyncio.create_task(c.run()))
            await asyncio.sleep(0.002)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        bad = [r for r in results if isinstance(r, BaseException)]
        if bad:
            print(f"client process {offset}: {len(bad)} clients failed, e.g. {bad[0]!r}", file=sys.stderr)

    asyncio.run(main())


def run(n: int, rounds: int, dim: int, procs: int, train: bool, shared_connection: bool, heartbeat_s: float, deadline_s: float) -> dict:
    raise_fd_limit()
    learner = make_learner(train, dim)
    uplink = parse_chain("none")
    with tempfile.TemporaryDirectory() as state:
        store = TokenStore.open(state)
        tokens = store.add_many([f"c{i}" for i in range(n)])
        toks = [tokens[f"c{i}"] for i in range(n)]
        rss_idle = proc_status("VmRSS")
        transport = GrpcTransport("127.0.0.1:0", tokens=store, spec=learner.spec, heartbeat_interval_s=heartbeat_s,
                                  maximum_concurrent_rpcs=None)
        ctx = mp.get_context("spawn")
        per = -(-n // procs)
        workers = [
            ctx.Process(target=client_process, args=(transport.address, toks[i:i + per], i, train, dim, shared_connection, heartbeat_s), daemon=True)
            for i in range(0, n, per)
        ]
        t_connect = time.perf_counter()
        for w in workers:
            w.start()
        ids = transport.wait_available(n, timeout_s=300, poll_s=0.5)
        connect_s = time.perf_counter() - t_connect
        if len(ids) < n:
            raise SystemExit(f"only {len(ids)} of {n} clients connected within 300 s")
        time.sleep(1.0)
        rss_connected = proc_status("VmRSS")

        params = learner.init_params(0)
        version = 0
        latencies, cpu, replies, dropped = [], [], [], 0
        reasons: collections.Counter[str] = collections.Counter()
        for r in range(1, rounds + 1):
            cohort = list(transport.available(r))
            task = Task(r, version, parse_chain("none").encode(params)[0], "none",
                        {"lr": 0.05, "local_epochs": 1, "batch_size": 8, "seed": 1}, deadline_s=deadline_s)
            c0, t0 = cpu_seconds(), time.perf_counter()
            total, count = torch.zeros(learner.spec.dim), 0
            for rep in transport.dispatch(task, cohort):
                if isinstance(rep.message, Update):
                    total += uplink.decode(rep.message.payload)
                    count += 1
                else:
                    dropped += 1
                    reasons[rep.message.reason.split(" (")[0]] += 1
            if count:
                params = params + total / count
                version += 1
            latencies.append(time.perf_counter() - t0)
            cpu.append(cpu_seconds() - c0)
            replies.append(count)
        peak = proc_status("VmHWM")
        transport.finish()
        transport.close(grace_s=2.0, linger_s=3 * heartbeat_s)
        for w in workers:
            w.join(60)
        refusals = transport.refusals_total()
        store.close()
    lat = np.asarray(latencies)
    return {
        "clients": n,
        "dim": learner.spec.dim,
        "rounds": rounds,
        "connect_s": connect_s,
        "rounds_per_min": 60.0 * rounds / lat.sum(),
        "p50_s": float(np.percentile(lat, 50)),
        "p99_s": float(np.percentile(lat, 99)),
        "cpu_per_round_s": statistics.mean(cpu),
        "replies_min": min(replies),
        "dropped": dropped,
        "rss_idle_mib": rss_idle,
        "rss_connected_mib": rss_connected,
        "per_conn_kib": (rss_connected - rss_idle) * 1024 / n,
        "peak_rss_mib": peak,
        "refusals": refusals,
        "dropouts": dict(reasons),
        "latencies": [round(x, 3) for x in latencies],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--dim", type=int, default=650, help="model parameters (float32) for the synthetic learner (default: logistic 64x10)")
    p.add_argument("--procs", type=int, default=2, help="client processes")
    p.add_argument("--train", action="store_true", help="clients train a logistic model with TorchLearner")
    p.add_argument("--shared-connection", action="store_true", help="clients of a process share one TCP connection")
    p.add_argument("--heartbeat", type=float, default=5.0)
    p.add_argument("--deadline", type=float, default=120.0)
    args = p.parse_args()

    print(f"machine: {os.cpu_count()} CPUs; server in pid {os.getpid()}, clients in {args.procs} processes; "
          f"{'TorchLearner (logistic)' if args.train else 'synthetic deltas'}; "
          f"{'shared' if args.shared_connection else 'one TCP connection per client'}", flush=True)
    rows = []
    for n in args.clients:
        row = run(n, args.rounds, args.dim, args.procs, args.train, args.shared_connection, args.heartbeat, args.deadline)
        rows.append(row)
        print(f"  N={n}: done ({row})", flush=True)
    print()
    print("| clients | params | rounds | rounds/min | round p50 (s) | round p99 (s) | server CPU/round (s) | updates/round (min) | peak RSS (MiB) | RSS idle -> connected (MiB) | per connection (KiB) | connect all (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['dim']} | {r['rounds']} | {r['rounds_per_min']:.1f} | {r['p50_s']:.3f} | {r['p99_s']:.3f} | "
              f"{r['cpu_per_round_s']:.3f} | {r['replies_min']} | {r['peak_rss_mib']:.0f} | {r['rss_idle_mib']:.0f} -> {r['rss_connected_mib']:.0f} | "
              f"{r['per_conn_kib']:.0f} | {r['connect_s']:.1f} |")


if __name__ == "__main__":
    main()
