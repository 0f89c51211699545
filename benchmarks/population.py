"""Population scale: memory is O(cohort x model), never O(population x model).

    .venv/bin/python benchmarks/population.py                 # 10,000 and 100,000 clients
    .venv/bin/python benchmarks/population.py --populations 10000 100000 1000000 --rounds 5
    .venv/bin/python benchmarks/population.py --populations 100000 --rounds 20 --repeats 1 \
        --uplink "ef | topk:0.1,block=16 | q8" --state-mb 64      # clients that keep state

Workload: digits, IID with `data.examples_per_client = 2` (each client draws 2
examples with replacement, so the population can exceed the dataset), no local
test split (`data.local_test_fraction = 0`, `data.min_examples = 1`), the default
64-128-10 MLP and client settings, 1,000 clients per round, 5 rounds, federated
evaluation on a small sample (`server.eval_clients`), run store and monitors on.
Each population runs in its own process, so its peak RSS is its own.

`--uplink` with error feedback makes every client that trains keep a residual of the
model's size between rounds (SCAFFOLD's c_i and personal heads behave the same): the
state store (`fleetlearn.client.state_store`) keeps at most `--state-mb`
(`engine.client_state_memory_mb`) of them in memory and the rest in the run directory's
state file; the row reports the states held, in memory and on disk.

Per-client metadata is what the population costs by construction: the device
fleet's arrays (`Fleet`) and the data's index arrays (`train_order`,
`train_offsets`, `test_order`, `test_offsets`), measured from the objects
themselves.  The acceptance check: the peak RSS grows from the smallest to the
largest population by no more than the metadata the extra clients bring.

Measuring peak RSS: glibc raises its mmap threshold after the first large free,
so the large temporaries of loading (partition, per-client statistics) are then
carved from the heap and stay resident after they are freed; peak RSS then
counts memory that is no longer used, and varies by +-10 MB from run to run.
By default each child runs with `MALLOC_MMAP_THRESHOLD_=131072` (glibc's initial
value, kept fixed: large blocks are always mmapped and returned on free), so RSS
follows live memory; `--mmap-threshold 0` keeps glibc's dynamic default.  Each
population runs `--repeats` times and the smallest peak is compared.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def _rss_mb() -> float:
    """Current resident set size (MB), from /proc (Linux)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def config(population: int, cohort: int, rounds: int, eval_clients: int, root: str, uplink: str = "none",
           state_mb: float | None = None) -> dict:
    cfg = {
        "seed": 0,
        "data": {
            "dataset": "digits", "clients": population, "partition": "iid", "examples_per_client": 2,
            "local_test_fraction": 0.0, "min_examples": 1,
        },
        "server": {"rounds": rounds, "cohort": cohort, "eval_clients": eval_clients},
        "compression": {"uplink": uplink},
        "store": {"root": root},
    }
    if state_mb is not None:
        cfg["engine"] = {"client_state_memory_mb": state_mb}
    return cfg


def metadata_bytes(coord) -> dict:
    """Bytes of per-client arrays: the fleet's and the data's index arrays."""
    import numpy as np

    fleet = coord.transport.fleet if hasattr(coord.transport, "fleet") else coord.transport.sim.fleet
    data = coord.transport.data
    fleet_b = sum(int(getattr(fleet, f).nbytes) for f in ("compute_sps", "uplink_mbps", "downlink_mbps", "latency_s", "dropout", "phase", "online_frac")
                  if isinstance(getattr(fleet, f), np.ndarray))
    index_b = sum(int(getattr(data, f).nbytes) for f in ("train_order", "train_offsets", "test_order", "test_offsets"))
    return {"fleet_bytes": fleet_b, "index_bytes": index_b}


def one(population: int, cohort: int, rounds: int, eval_clients: int, uplink: str = "none", state_mb: float | None = None) -> dict:
    t0 = time.perf_counter()
    import torch

    import fleetlearn  # noqa: F401  (imports counted in the baseline)
    from fleetlearn.config import load_config
    from fleetlearn.engine.factory import build_coordinator

    stages = {"imports": (_rss_mb(), _peak_mb())}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(config(population, cohort, rounds, eval_clients, tmp, uplink, state_mb))
        coord = build_coordinator(cfg)
        stages["built"] = (_rss_mb(), _peak_mb())
        meta = metadata_bytes(coord)
        t_run = time.perf_counter()
        summary = coord.run()
        run_s = time.perf_counter() - t_run
        stages["ran"] = (_rss_mb(), _peak_mb())
        states = coord.client_states
        state_file = states.path.stat().st_size if states.path is not None and states.path.exists() else 0
        held = {"state_clients": len(states), "state_memory_mb": states.nbytes() / 2**20, "state_file_mb": state_file / 2**20}
    recs = summary.records
    return {
        "population": population,
        "cohort": cohort,
        "rounds": len(recs),
        "accepted": [r.accepted for r in recs],
        "round_s": [r.wall_seconds for r in recs],
        "run_s": run_s,
        "process_s": time.perf_counter() - t0,
        "accuracy": summary.final_accuracy,
        "peak_rss_mb": _peak_mb(),
        "stages": stages,
        "model_dim": coord.dim,
        "torch_threads": torch.get_num_threads(),
        "uplink": uplink,
        **held,
        **meta,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--populations", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--cohort", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--eval-clients", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3, help="runs per population; the smallest peak RSS is compared")
    ap.add_argument("--mmap-threshold", type=int, default=131072, help="MALLOC_MMAP_THRESHOLD_ for the children (0: glibc's dynamic default)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads in the children (0: torch's default)")
    ap.add_argument("--uplink", default="none", help="the uplink chain (one with ef: every client that trains keeps state)")
    ap.add_argument("--state-mb", type=float, help="engine.client_state_memory_mb (default: the config's)")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(one(args.one, args.cohort, args.rounds, args.eval_clients, args.uplink, args.state_mb)))
        return
    env = dict(os.environ)
    if args.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    rows = []
    for n in args.populations:
        runs = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = subprocess.run(
                [sys.executable, __file__, "--one", str(n), "--cohort", str(args.cohort), "--rounds", str(args.rounds),
                 "--eval-clients", str(args.eval_clients), "--threads", str(args.threads), "--uplink", args.uplink]
                + (["--state-mb", str(args.state_mb)] if args.state_mb is not None else []),
                capture_output=True, text=True, env=env,
            )
            if out.returncode != 0:
                sys.exit(f"population {n} failed:\n{out.stderr[-4000:]}")
            run = json.loads(out.stdout.strip().splitlines()[-1])
            run["wall_s"] = time.perf_counter() - t0
            runs.append(run)
        row = min(runs, key=lambda r: r["peak_rss_mb"])
        row["peaks_mb"] = [r["peak_rss_mb"] for r in runs]
        rows.append(row)
    print(f"{args.cohort} clients per round, {args.rounds} rounds, model d = {rows[0]['model_dim']}, torch threads {rows[0]['torch_threads']}, "
          f"MALLOC_MMAP_THRESHOLD_ = {args.mmap_threshold or 'glibc default'}, {args.repeats} run(s) per population, "
          f"uplink {args.uplink!r}, state memory cap {args.state_mb if args.state_mb is not None else 'default'} MB")
    print(f"{'population':>10} {'rounds ok':>9} {'s/round':>8} {'peak RSS MB':>12} {'peaks of the runs':>24} {'RSS built MB':>13} "
          f"{'meta B/client':>14} {'fleet MB':>9} {'index MB':>9} {'accuracy':>9} {'process s':>10}")
    for r in rows:
        meta = r["fleet_bytes"] + r["index_bytes"]
        ok = sum(a > 0 for a in r["accepted"])
        peaks = " ".join(f"{p:.0f}" for p in r["peaks_mb"])
        print(f"{r['population']:>10} {ok:>5}/{r['rounds']:<3} {sum(r['round_s']) / len(r['round_s']):>8.3f} {r['peak_rss_mb']:>12.1f} "
              f"{peaks:>24} {r['stages']['built'][0]:>13.1f} {meta / r['population']:>14.1f} {r['fleet_bytes'] / 2**20:>9.2f} "
              f"{r['index_bytes'] / 2**20:>9.2f} {r['accuracy']:>9.3f} {r['wall_s']:>10.1f}")
        if r["state_clients"]:
            print(f"{'':>10} client state: {r['state_clients']:,} clients, {r['state_memory_mb']:.1f} MB in memory, "
                  f"{r['state_file_mb']:.1f} MB in the state file")
    small, large = rows[0], rows[-1]
    if len(rows) > 1:
        growth = (large["peak_rss_mb"] - small["peak_rss_mb"]) * 2**20
        budget = (large["fleet_bytes"] + large["index_bytes"]) - (small["fleet_bytes"] + small["index_bytes"])
        verdict = "PASS" if growth <= budget else "FAIL"
        print(f"peak RSS growth {small['population']:,} -> {large['population']:,}: {growth / 2**20:.2f} MB; "
              f"per-client metadata of the extra {large['population'] - small['population']:,} clients: {budget / 2**20:.2f} MB -> {verdict}")
        all_rounds = all(sum(a > 0 for a in r["accepted"]) == r["rounds"] == args.rounds for r in rows)
        print(f"every population ran {args.rounds} rounds with accepted updates: {'PASS' if all_rounds else 'FAIL'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
