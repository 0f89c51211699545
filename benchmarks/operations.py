"""Operations: automatic rollback of an injected fault, and canary decisions.

    python benchmarks/operations.py                 # seeds 0 1 2 (~3 min on 2 loaded cores)
    python benchmarks/operations.py --seeds 0       # one seed

Fault (issue 8's acceptance): digits, 60 clients (Dirichlet 1.0), cohort 20, 30
rounds, 5 local epochs; from round 10, 30% of the population send their update
scaled x10 (`[attack] kind = "scaling"`, independent attackers) into a plain mean.
Guardrail on divergence, outlier_updates and drift; flagged clients are excluded
for the rest of the run.  Columns: final accuracy of the clean run (same config,
no fault) and the faulty run, the first rolled-back round at or after 10, the
number of rolled-back rounds, and how many rounds that aggregated an attacker's
update shipped (committed).

Canary: digits, 40 clients (Dirichlet 1.0), cohort 10, 10 rounds, 2 local epochs;
the candidate trains on half the clients and half the cohort for rounds 3-7, rule:
mean central accuracy of the last 3 canary rounds, margin 0.  "worse": production
client lr 0.1, candidate x10 (1.0); "better": production 0.005, candidate x10 (0.05).
(lr 0.05 -> 0.5 is not reliably worse here: seed 1 promoted it, seed 2 rejected
it by 0.4 pp; a tenfold lr is only "worse" when it overshoots.)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


import fleetlearn

FAULT_CONFIG = {
    "data": {"clients": 60, "alpha": 1.0},
    "server": {"rounds": 30, "cohort": 20},
    "client": {"local_epochs": 5},
    "monitoring": {"guardrail": ["divergence", "outlier_updates", "drift"], "guardrail_exclude_rounds": 100,
                   "outlier_threshold": 5.0, "drift_threshold": 0.15},
}
FAULT = {"kind": "scaling", "fraction": 0.3, "start_round": 10, "scale": 10.0, "collude": False}


def canary_config(lr: float, candidate: str) -> dict:
    return {"data": {"clients": 40, "alpha": 1.0}, "server": {"rounds": 10, "cohort": 10}, "client": {"local_epochs": 2, "lr": lr},
            "canary": {"set": [candidate], "fraction": 0.5, "start_round": 3, "rounds": 5, "window": 3}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="fleetlearn-ops-"))
    print("## fault: scaling x10 by 30% of clients from round 10, plain mean\n")
    print("| seed | clean acc | faulty acc | diff pp | first rollback | rolled-back rounds | attacked rounds shipped | wall s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for seed in args.seeds:
        t0 = time.perf_counter()
        clean = fleetlearn.run({**FAULT_CONFIG, "seed": seed, "store": {"root": str(root)}})
        faulty = fleetlearn.run({**FAULT_CONFIG, "seed": seed, "attack": FAULT, "store": {"root": str(root)}})
        rb = [r.round for r in faulty.records if r.status == "rolled_back" and r.round >= 10]
        shipped = sum(1 for r in faulty.records if r.round >= 10 and r.extra.get("malicious") and r.status == "ok")
        print(f"| {seed} | {clean.final_accuracy:.4f} | {faulty.final_accuracy:.4f} | {100 * (faulty.final_accuracy - clean.final_accuracy):+.1f} | "
              f"{rb[0] if rb else '-'} | {sum(r.status == 'rolled_back' for r in faulty.records)} | {shipped} | {time.perf_counter() - t0:.0f} |", flush=True)
    print("\n## canary: candidate client lr x10\n")
    print("| seed | case | decision | production acc | candidate acc | final acc |")
    print("|---:|---|---|---:|---:|---:|")
    for seed in args.seeds:
        for case, lr, cand in (("worse", 0.1, "client.lr=1.0"), ("better", 0.005, "client.lr=0.05")):
            s = fleetlearn.run({**canary_config(lr, cand), "seed": seed, "store": {"root": str(root)}})
            d = next(r.extra["canary"]["decision"] for r in s.records if "decision" in (r.extra.get("canary") or {}))
            print(f"| {seed} | {case} | {d['decision']} | {d['production']:.4f} | {d['candidate']:.4f} | {s.final_accuracy:.4f} |", flush=True)


if __name__ == "__main__":
    main()
