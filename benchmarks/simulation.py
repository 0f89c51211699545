"""Simulation speed: time per round, clients per second, engine cost per client and
peak memory for populations of 10, 100 and 1000 clients, every client training every round.

    .venv/bin/python benchmarks/simulation.py            # the table in BENCHMARKS.md
    .venv/bin/python benchmarks/simulation.py --rounds 10

Workload: the default job (digits, 64-128-10 MLP, Dirichlet 0.5), with
cohort = population.  For 1000 clients each holds about 2 examples (IID, no local
test split), so the round is dominated by the engine's own bookkeeping: the
"engine ms/client" column is (round wall time - local training wall time) / clients,
which includes selection, encoding, decoding, validation, aggregation, evaluation
and the store commit.  Each population runs in its own process so peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile

CASES = {
    10: {"data": {"clients": 10}},
    100: {"data": {"clients": 100}},
    1000: {"data": {"clients": 1000, "partition": "iid", "test_fraction": 0.05, "local_test_fraction": 0.0, "min_examples": 1}},
}


def one(n: int, rounds: int) -> dict:
    import time

    import fleetlearn

    cfg = {k: dict(v) for k, v in CASES[n].items()}
    cfg["server"] = {"rounds": rounds + 1, "cohort": n}
    with tempfile.TemporaryDirectory() as tmp:
        cfg["store"] = {"root": tmp}
        t0 = time.perf_counter()
        s = fleetlearn.run(cfg)
        total = time.perf_counter() - t0
    recs = s.records[1:]  # round 1 pays one-off warm-up (first batched-gradient call)
    wall = sum(r.wall_seconds for r in recs) / len(recs)
    train = sum(r.train_wall_seconds for r in recs) / len(recs)
    return {
        "clients": n,
        "round_s": wall,
        "clients_per_s": n / wall,
        "train_s": train,
        "engine_ms_per_client": 1000 * (wall - train) / n,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "accuracy": s.final_accuracy,
        "total_s": total,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.rounds)))
        return
    rows = []
    for n in CASES:
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--rounds", str(args.rounds)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'clients':>8} {'s/round':>9} {'clients/s':>10} {'train s':>9} {'engine ms/client':>17} {'peak RSS MB':>12} {'accuracy':>9}")
    for r in rows:
        print(f"{r['clients']:>8} {r['round_s']:>9.4f} {r['clients_per_s']:>10.0f} {r['train_s']:>9.4f} {r['engine_ms_per_client']:>17.4f} {r['peak_rss_mb']:>12.0f} {r['accuracy']:>9.3f}")


if __name__ == "__main__":
    main()
