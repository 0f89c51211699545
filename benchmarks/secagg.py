"""Secure aggregation over gRPC: what SecAgg (all pairs) and SecAgg+ (a k-regular neighbour
graph, k ~ 2 log2 n) cost per client and on the server, against the same rounds without it.

    python benchmarks/secagg.py                                   # 100 and 500 clients, d = 100000
    python benchmarks/secagg.py --plus-clients 1000               # ... and SecAgg+ (with plain) at 1000
    python benchmarks/secagg.py --clients 10 20 --dim 1000 --rounds 1   # a quick check

The server (`GrpcTransport`, plaintext on 127.0.0.1, token auth) runs in this process and
does a round's server work: publish the task, collect the updates, then (SecAgg) drive the
five SecAgg stages and dequantize the unmasked sum, or (plain) decode and average the
float32 updates.  The clients are real `FleetClient`s (the one client device, the one
SecAgg client code path: transport/grpc/secagg.take_part), as asyncio coroutines spread
over `--procs` processes, each with its own TCP connection; "training" is a seeded random
delta (benchmarks/grpc_load.SyntheticLearner), so the numbers measure the protocol.

Reported per mode and cohort size n, averaged over the rounds:
  client KiB/round   bytes a client sends + receives in a round (task, update, SecAgg messages)
  client SecAgg s    seconds a client computes in the SecAgg stages (key agreements, share
                     encryption, mask expansion, quantization; wall time around its own work)
  client SecAgg CPU s  the same work in CPU seconds of its thread (other processes' load
                     does not inflate it; the clients are coroutines on one thread per process)
  server s/round     wall seconds of a round on the server (dispatch -> aggregate)
  server CPU s       CPU seconds of the server process in a round
  overhead           each against the plain round of the same n
and the growth of the per-client cost from the smallest n to each larger one, which SecAgg+
should keep near log n (its degree k ~ 2 log2 n) and all pairs lets grow with n.  The load
average (`uptime`) is printed before and after: timings from a loaded machine are noisy
(bytes are exact regardless).

Do not run the full size on a shared machine: it is CPU-bound (n^2 mask expansions for
all pairs at n = 500).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _swarm import run_clients  # noqa: E402
from grpc_load import SyntheticLearner, client_data, cpu_seconds, raise_fd_limit  # noqa: E402

from fleetlearn.compression import parse_chain  # noqa: E402
from fleetlearn.messages import Task, Update  # noqa: E402
from fleetlearn.privacy.secagg import SecureAggregation  # noqa: E402
from fleetlearn.transport.grpc import Backoff, FleetClient, GrpcTransport, TokenStore  # noqa: E402


def secagg_plus_degree(n: int) -> int:
    """SecAgg+'s graph degree: an even k ~ 2 log2 n (Bell et al. 2020 use k = O(log n)), below n - 1."""
    k = 2 * math.ceil(math.log2(max(n, 2)))
    return min(k, (n - 2) - (n - 2) % 2)


def client_process(address: str, tokens: list[str], offset: int, dim: int, out: "mp.Queue") -> None:
    raise_fd_limit()
    torch.set_num_threads(1)
    learner = SyntheticLearner(dim)

    clients = run_clients(lambda i: FleetClient(address, tokens[i], learner, client_data(offset + i), name=f"c{offset + i}",
                                                backoff=Backoff(0.2, 5.0), give_up_after_s=120, train_in_thread=False,
                                                channel_options=[("grpc.use_local_subchannel_pool", 1)], seed=offset + i,
                                                call_timeout_s=120.0), len(tokens))
    out.put([c.report.secagg for c in clients])


def run(n: int, mode: str, rounds: int, dim: int, procs: int, deadline_s: float) -> dict:
    raise_fd_limit()
    learner = SyntheticLearner(dim)
    uplink = parse_chain("none")
    neighbors = None if mode != "secagg+" else secagg_plus_degree(n)
    with tempfile.TemporaryDirectory() as state:
        store = TokenStore.open(state)
        tokens = store.add_many([f"c{i}" for i in range(n)])
        toks = [tokens[f"c{i}"] for i in range(n)]
        # Hundreds of clients share 2 processes here, so one client's CPU-bound SecAgg work
        # delays the others' heartbeats far beyond what a real device sees: liveness waits for
        # the deadline instead of 3 heartbeats (a real fleet keeps the default).
        transport = GrpcTransport("127.0.0.1:0", tokens=store, spec=learner.spec, heartbeat_interval_s=5.0, max_round_s=deadline_s,
                                  heartbeat_timeout_s=deadline_s, secagg=mode != "plain")
        secure = None
        if mode != "plain":
            secure = SecureAggregation(clip_range=1.0, max_clients=n, modulus_bits=32, neighbors=neighbors)
            secure.remote = transport.secure_aggregation()
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        per = -(-n // procs)
        workers = [ctx.Process(target=client_process, args=(transport.address, toks[i:i + per], i, dim, queue), daemon=True)
                   for i in range(0, n, per)]
        for w in workers:
            w.start()
        if len(transport.wait_available(n, timeout_s=600, poll_s=0.5)) < n:
            raise SystemExit(f"not all {n} clients connected")
        params = learner.init_params(0)
        wall, cpu, up, down = [], [], [], []
        for r in range(1, rounds + 1):
            payload = uplink.encode(params)[0]
            task = Task(r, r - 1, payload, "none", {"lr": 0.05, "local_epochs": 1, "batch_size": 8, "seed": 1}, deadline_s=deadline_s)
            c0, t0 = cpu_seconds(), time.perf_counter()
            ups = [rep.message for rep in transport.dispatch(task, list(transport.available(r))) if isinstance(rep.message, Update)]
            ids = [u.client_id for u in ups]
            if secure is None:
                delta = torch.stack([uplink.decode(u.payload, dim=dim) for u in ups]).mean(0)
                extra_up = extra_down = 0
            else:
                delta = secure.aggregate(None, np.ones(len(ids)), round=r, client_ids=ids)
                m = secure.last_remote.measurements
                extra_up, extra_down = m["secagg_uplink_bytes"], m["secagg_downlink_bytes"]
            wall.append(time.perf_counter() - t0)
            cpu.append(cpu_seconds() - c0)
            up.append((sum(len(u.payload) for u in ups) + extra_up) / len(ups))
            down.append(len(payload) + extra_down / len(ups))
            params = params + delta
        transport.finish()
        costs = [c for _ in workers for per_client in queue.get(timeout=600) for c in per_client]
        transport.close(grace_s=2.0, linger_s=15.0)
        for w in workers:
            w.join(60)
        store.close()
    return {"n": n, "mode": mode, "k": neighbors or (n - 1), "wall": statistics.mean(wall), "cpu": statistics.mean(cpu),
            "bytes": statistics.mean(up) + statistics.mean(down),
            "client_s": statistics.mean([c["compute_s"] for c in costs]) if costs else 0.0,
            "client_cpu": statistics.mean([c["cpu_s"] for c in costs]) if costs else 0.0}


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: %.2f, %.2f, %.2f" % os.getloadavg()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, nargs="+", default=[100, 500])
    p.add_argument("--plus-clients", type=int, nargs="*", default=[], help="more cohort sizes run for SecAgg+ (and plain) only")
    p.add_argument("--dim", type=int, default=100_000, help="model parameters (float32)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--procs", type=int, default=2, help="client processes")
    p.add_argument("--modes", nargs="+", default=["plain", "secagg", "secagg+"], choices=["plain", "secagg", "secagg+"])
    p.add_argument("--deadline", type=float, default=900.0, help="the round's deadline, applied to each SecAgg stage (s)")
    args = p.parse_args()
    if "plain" not in args.modes:
        args.modes = ["plain", *args.modes]
    plan = [(n, m) for n in args.clients for m in args.modes]
    plan += [(n, m) for n in args.plus_clients for m in ("plain", "secagg+") if (n, m) not in plan]
    print(f"machine: {os.cpu_count()} CPUs; server in pid {os.getpid()}, clients in {args.procs} processes; d = {args.dim}", flush=True)
    print(f"uptime before: {uptime()}", flush=True)
    rows = {}
    for n, mode in plan:
        rows[n, mode] = run(n, mode, args.rounds, args.dim, args.procs, args.deadline)
        print(f"  n={n} {mode}: {rows[n, mode]}  [{uptime()}]", flush=True)
    print(f"uptime after: {uptime()}", flush=True)
    print()
    print("| n | mode | graph degree | client KiB/round | x plain | client SecAgg s | client SecAgg CPU s | server s/round | x plain "
          "| server CPU s/round | x plain |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (n, mode), r in sorted(rows.items(), key=lambda kv: (kv[0][0], args.modes.index(kv[0][1]) if kv[0][1] in args.modes else 9)):
        b = rows[n, "plain"]
        print(f"| {n} | {mode} | {r['k'] if mode != 'plain' else '-'} | {r['bytes'] / 1024:.1f} | {r['bytes'] / b['bytes']:.2f} | "
              f"{r['client_s']:.3f} | {r['client_cpu']:.3f} | {r['wall']:.2f} | {r['wall'] / b['wall']:.1f} | {r['cpu']:.2f} | "
              f"{r['cpu'] / max(b['cpu'], 1e-9):.1f} |")
    print()
    for mode in args.modes + ["secagg+"] * ("secagg+" not in args.modes):
        sizes = sorted(n for (n, m) in rows if m == mode and mode != "plain")
        for hi in sizes[1:]:
            lo = sizes[0]
            a, z = rows[lo, mode], rows[hi, mode]
            grow = (z["bytes"] - rows[hi, "plain"]["bytes"]) / max(a["bytes"] - rows[lo, "plain"]["bytes"], 1)
            print(f"per-client growth, {mode}, n = {lo} -> {hi} (n x{hi / lo:.1f}, log2 n x{math.log2(hi) / math.log2(lo):.2f}, "
                  f"degree x{z['k'] / a['k']:.2f}): SecAgg bytes x{grow:.2f}, client CPU x{z['client_cpu'] / max(a['client_cpu'], 1e-9):.2f}, "
                  f"client wall x{z['client_s'] / max(a['client_s'], 1e-9):.2f}")


if __name__ == "__main__":
    main()
