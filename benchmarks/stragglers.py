"""Stragglers and dropouts: simulated time to a target accuracy per round policy, per fleet.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stragglers.py [--fleets uniform mixed_fleet flaky]
        [--rounds 40] [--target 0.85] [--seeds 0 1 2] [--jobs 2]

Fleets (each with 20% of devices 10x slower: slow_fraction = 0.2, slow_factor = 10):
`uniform` (identical devices), `mixed_fleet` (log-normal speeds and bandwidths), `flaky`
(mixed_fleet with diurnal availability and 30% mid-round dropout).  Digits, 100 clients,
Dirichlet(0.5), cohort 20.  Policies:

- wait-for-all: no deadline (a dropout is noticed when it happens; the round waits
  for the slowest selected device): synchronous FedAvg, the reference;
- deadline + over-selection 1.3: select 26, keep the first 20 replies, fixed deadline;
- adaptive deadline: over-selection 1.3, deadline = 0.8-quantile of the last 3 rounds'
  completion times;
- Oort + deadline: availability-aware selection, the fixed deadline, over-selection 1.3;
- FedBuff 60/10: 60 clients in flight, a server step every 10 updates, 1/sqrt(1+s)
  staleness weights with the default `staleness_step = "adaptive"`; also with
  `staleness_step = "fixed"` (the rule before it), and adaptive with 30 and with 20
  (the cohort) in flight;
- FedBuff 30/10 + task deadline: 30 in flight, adaptive step, every task with
  `deadline_s` = 2 x the synchronous deadline (3 s by default): a device silent past it
  frees its slot then instead of after the 10 s heartbeat timeout (the rule the README
  states for FedBuff).

Equal client updates: per seed, every FedBuff run takes round(U / 10) server steps,
U = the accepted updates of that seed's wait-for-all run (the sum of its records'
`accepted`), so FedBuff aggregates the same number of client updates (each FedBuff step
aggregates exactly 10) and its final accuracy compares with wait-for-all's.  Time to
target = simulated seconds until the central test accuracy first reaches the target.
Means over seeds.  FedBuff rows also give the staleness of the accepted updates, the
share of them from the slow 20% of devices and the mean scale of a step on server_lr
(`staleness_scale_mean`).
"""

from __future__ import annotations

import argparse
import math
from multiprocessing import Pool

import numpy as np
import torch

import fleetlearn

FLEETS = ("uniform", "mixed_fleet", "flaky")
BUFFER = 10


def base(fleet: str, seed: int) -> dict:
    return {
        "data": {"dataset": "digits", "clients": 100, "partition": "dirichlet", "alpha": 0.5},
        "devices": {"profile": fleet, "slow_fraction": 0.2, "slow_factor": 10.0},
        "seed": seed,
    }


def sync_policies(rounds: int, deadline: float) -> dict[str, dict]:
    sync = {"rounds": rounds, "cohort": 20}
    return {
        "wait-for-all": dict(sync),
        "deadline + over-selection 1.3": {**sync, "deadline_s": deadline, "over_selection": 1.3},
        "adaptive deadline": {**sync, "deadline_policy": "adaptive", "deadline_quantile": 0.8, "over_selection": 1.3},
        "Oort + deadline": {**sync, "selector": "oort", "deadline_s": deadline, "over_selection": 1.3},
    }


def fedbuff_policies(steps: int, deadline: float = 1.5) -> dict[str, dict]:
    fb = {"rounds": steps, "cohort": 20, "mode": "async", "buffer_size": BUFFER, "staleness_weight": "sqrt"}
    return {
        f"FedBuff 30/10 + deadline {2 * deadline:g} s": {**fb, "concurrency": 30, "staleness_step": "adaptive", "deadline_s": 2 * deadline},
        "FedBuff 60/10, adaptive": {**fb, "concurrency": 60, "staleness_step": "adaptive"},
        "FedBuff 60/10, fixed (old)": {**fb, "concurrency": 60, "staleness_step": "fixed"},
        "FedBuff 30/10, adaptive": {**fb, "concurrency": 30, "staleness_step": "adaptive"},
        "FedBuff 20/10, adaptive": {**fb, "concurrency": 20, "staleness_step": "adaptive"},
    }


def slow_clients(fleet: str, seed: int) -> np.ndarray:
    from fleetlearn.config import load_config
    from fleetlearn.devices.profiles import make_fleet

    dev = load_config(base(fleet, seed)).devices
    slow = make_fleet(dev, 100, seed).compute_sps
    plain = make_fleet(dev.model_copy(update={"slow_fraction": 0.0}), 100, seed).compute_sps
    return np.flatnonzero(plain / slow > 1.5)


def one(job: tuple) -> dict:
    fleet, seed, name, server, target = job
    torch.set_num_threads(1)
    s = fleetlearn.run({**base(fleet, seed), "server": server}, store=False)
    acc = [x for r in s.records for x in r.clients if x.status == "accepted"]
    out = {"fleet": fleet, "seed": seed, "policy": name, "time": s.seconds_to(target), "final": s.final_accuracy,
           "sim": s.sim_seconds, "updates": sum(r.accepted for r in s.records)}
    if server.get("mode") == "async":
        st = np.array([x.staleness for x in acc], dtype=np.float64)
        slow = set(slow_clients(fleet, seed).tolist())
        out["staleness"] = float(st.mean())
        out["staleness_p90"] = float(np.percentile(st, 90))
        out["slow_share"] = sum(x.client_id in slow for x in acc) / max(len(acc), 1)
        out["step"] = float(np.nanmean([r.extra.get("staleness_scale_mean", math.nan) for r in s.records]))
    return out


def run(fleets, rounds: int, target: float, seeds, deadline: float, jobs: int) -> list[dict]:
    first = [(f, seed, name, server, target) for f in fleets for seed in seeds
             for name, server in sync_policies(rounds, deadline).items()]
    with Pool(jobs) as pool:
        rows = pool.map(one, first, chunksize=1)
        ref = {(r["fleet"], r["seed"]): r["updates"] for r in rows if r["policy"] == "wait-for-all"}
        second = [(f, seed, name, server, target) for f in fleets for seed in seeds
                  for name, server in fedbuff_policies(max(1, round(ref[f, seed] / BUFFER)), deadline).items()]
        rows += pool.map(one, second, chunksize=1)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fleets", nargs="+", choices=FLEETS, default=list(FLEETS))
    ap.add_argument("--rounds", type=int, default=40, help="rounds of the synchronous policies")
    ap.add_argument("--target", type=float, default=0.85)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--deadline", type=float, default=1.5, help="fixed deadline, simulated seconds")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (processes)")
    args = ap.parse_args()
    rows = run(args.fleets, args.rounds, args.target, args.seeds, args.deadline, args.jobs)
    print(f"target accuracy {args.target}; synchronous policies {args.rounds} rounds; seeds {args.seeds}; "
          f"FedBuff at the wait-for-all run's accepted updates")
    for fleet in args.fleets:
        mine = [r for r in rows if r["fleet"] == fleet]
        names = list(dict.fromkeys(r["policy"] for r in mine))
        mean = {n: {k: float(np.mean([r[k] for r in mine if r["policy"] == n]))
                    for k in mine[0] if k not in ("fleet", "seed", "policy")} | {
                    k: float(np.mean([r[k] for r in mine if r["policy"] == n]))
                    for k in ("staleness", "staleness_p90", "slow_share", "step") if k in next(r for r in mine if r["policy"] == n)}
                for n in names}
        ref = mean["wait-for-all"]
        best_sync = min(mean[n]["time"] for n in sync_policies(1, 1.0))
        print(f"\nfleet {fleet} (best synchronous time to target {best_sync:.1f} s; wait-for-all final {ref['final']:.4f})")
        print(f"{'policy':<32} {'s to target':>11} {'final acc':>9} {'vs w-f-a':>8} {'updates':>8} {'sim s':>7}  staleness mean/p90, slow share, step")
        for n in names:
            m = mean[n]
            extra = (f"  {m['staleness']:.2f}/{m['staleness_p90']:.1f}, {m['slow_share']:.2f}, {m['step']:.3f}"
                     if "staleness" in m else "")
            print(f"{n:<32} {m['time']:>11.1f} {m['final']:>9.4f} {100 * (m['final'] - ref['final']):>+7.2f}pp "
                  f"{m['updates']:>8.0f} {m['sim']:>7.1f}{extra}")
        for r in sorted(mine, key=lambda r: (r["policy"], r["seed"])):
            print(f"  seed {r['seed']} {r['policy']:<30} time {r['time']:.1f} final {r['final']:.4f} updates {r['updates']}")


if __name__ == "__main__":
    main()
