"""Operations: automatic rollback of an injected fault, canary decisions, false alarms and detection delay.

    python benchmarks/operations.py                 # every table, seeds 0 1 2
    python benchmarks/operations.py --seeds 0       # one seed
    python benchmarks/operations.py --tables false_alarms delays --jobs 2
    python benchmarks/operations.py --tables false_alarms --partitions 0.5 --fleets mixed_fleet --rounds 15

False alarms (issue 21): clean runs of the default digits job (100 clients, cohort
30, 10 local epochs) with deadline 2 s and over-selection 1.3, over each partition
(`iid`, Dirichlet 0.5, 0.1) and device fleet (`uniform`, `mixed_fleet`, `flaky`),
every detector on with its defaults and 4 probe updates a round.  Columns: rounds
run, info alerts, warnings and critical alerts (any detector, probes included),
warnings per 100 rounds, and which detectors warned.

Detection delay: the same job (Dirichlet 0.5, `mixed_fleet`), a fault from round
10 of 20: `divergence` (the server learning rate pushed x50), `scaling` (30% of the
population send updates x10), `label_flip` (30% train on flipped labels), and
`dead_codec` (the uplink q8 value codec starts writing zeros: every update arrives
empty).  Columns: the first round at or after 10 with a warning or critical alert,
the delay in rounds (0: the fault's first round), the detectors that fired then,
and the warnings before the fault (false alarms of that run).

Fault (issue 8's acceptance): digits, 60 clients (Dirichlet 1.0), cohort 20, 30
rounds, 5 local epochs; from round 10, 30% of the population send their update
scaled x10 (`[attack] kind = "scaling"`, independent attackers) into a plain mean.
Guardrail on divergence, outlier_updates and drift, acting on every alert
(`guardrail_min_severity = "info"`: every odd update, not only what a person is
warned about); flagged clients are excluded for the rest of the run.  Columns: final accuracy of the clean run (same config,
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
import multiprocessing
import tempfile
import time
from collections import Counter

import torch


import fleetlearn
from fleetlearn.api import build

FAULT_CONFIG = {
    "data": {"clients": 60, "alpha": 1.0},
    "server": {"rounds": 30, "cohort": 20},
    "client": {"local_epochs": 5},
    "monitoring": {"guardrail": ["divergence", "outlier_updates", "drift"], "guardrail_exclude_rounds": 100,
                   "guardrail_min_severity": "info", "drift_threshold": 0.15},
}
FAULT = {"kind": "scaling", "fraction": 0.3, "start_round": 10, "scale": 10.0, "collude": False}


def canary_config(lr: float, candidate: str) -> dict:
    return {"data": {"clients": 40, "alpha": 1.0}, "server": {"rounds": 10, "cohort": 10}, "client": {"local_epochs": 2, "lr": lr},
            "canary": {"set": [candidate], "fraction": 0.5, "start_round": 3, "rounds": 5, "window": 3}}


PARTITIONS = ("iid", "0.5", "0.1")
FLEETS = ("uniform", "mixed_fleet", "flaky")
FAULTS = ("divergence", "scaling", "label_flip", "dead_codec")
FAULT_START = 10


def clean_config(partition: str, fleet: str, seed: int, rounds: int, root: str) -> dict:
    data = {"partition": "iid"} if partition == "iid" else {"partition": "dirichlet", "alpha": float(partition)}
    return {"seed": seed, "data": data, "server": {"rounds": rounds, "deadline_s": 2.0, "over_selection": 1.3},
            "devices": {"profile": fleet}, "monitoring": {"probe_updates": 4}, "store": {"root": root}}


class InjectFault:
    """A round hook, placed after the monitoring hooks: after round ``start - 1`` is
    finished, breaks the run so every round from ``start`` on runs with the fault."""

    def __init__(self, kind: str, start: int):
        self.kind, self.start = kind, start

    def after_round(self, record, coordinator) -> None:
        if record.round != self.start - 1:
            return
        if self.kind == "divergence":  # a bad learning-rate push
            opt = coordinator.server_optimizer
            coordinator.server_state = opt.lr.scaled(coordinator.server_state, 50.0, 0.0)
        elif self.kind == "dead_codec":  # the value codec the clients share writes zeros
            codec = coordinator.uplink.value
            write = codec.write
            codec.write = lambda x, rng: write(torch.zeros_like(x), rng)


def _alerts(records):
    return [a for r in records for a in r.extra.get("alerts") or []]


def false_alarm_run(job) -> dict:
    partition, fleet, seed, rounds, root = job
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    s = fleetlearn.run(clean_config(partition, fleet, seed, rounds, root))
    alerts = _alerts(s.records)
    sev = Counter(a["severity"] for a in alerts)
    warned = Counter(a["detector"] for a in alerts if a["severity"] != "info")
    return {"partition": partition, "fleet": fleet, "seed": seed, "rounds": len(s.records), "info": sev["info"],
            "warning": sev["warning"], "critical": sev["critical"], "warned": warned, "acc": s.final_accuracy,
            "wall": time.perf_counter() - t0}


def fault_run(job) -> dict:
    kind, seed, rounds, root = job
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    cfg = clean_config("0.5", "mixed_fleet", seed, rounds, root)
    if kind in ("scaling", "label_flip"):
        cfg["attack"] = {"kind": kind, "fraction": 0.3, "start_round": FAULT_START, "scale": 10.0, "collude": False}
    if kind == "dead_codec":
        cfg["compression"] = {"uplink": "q8"}
    coordinator = build(fleetlearn.load_config(cfg))
    coordinator.hooks.append(InjectFault(kind, FAULT_START))  # after the monitoring hooks
    s = coordinator.run()
    loud = [(r.round, a) for r in s.records for a in r.extra.get("alerts") or [] if a["severity"] != "info"]
    after = [(rd, a) for rd, a in loud if rd >= FAULT_START]
    first = min((rd for rd, _ in after), default=None)
    fired = sorted({f"{a['detector']} ({a['severity']})" for rd, a in after if rd == first})
    return {"fault": kind, "seed": seed, "first": first, "delay": None if first is None else first - FAULT_START,
            "fired": fired, "before": sum(1 for rd, _ in loud if rd < FAULT_START), "wall": time.perf_counter() - t0}


def _map(fn, jobs, n):
    if n <= 1:
        yield from map(fn, jobs)
        return
    with multiprocessing.get_context("spawn").Pool(n) as pool:
        yield from pool.imap(fn, jobs)


def false_alarm_table(args, root: str) -> None:
    print("\n## false alarms: clean runs (deadline 2 s, over-selection 1.3, every detector, 4 probes)\n")
    print("| partition | fleet | seeds | rounds | info | warnings | critical | warnings / 100 rounds | warned by | final acc | wall s |")
    print("|---|---|---|---:|---:|---:|---:|---:|---|---|---:|")
    jobs = [(p, f, seed, args.rounds, root) for p in args.partitions for f in args.fleets for seed in args.seeds]
    rows: dict[tuple[str, str], list[dict]] = {}
    for res in _map(false_alarm_run, jobs, args.jobs):
        key = (res["partition"], res["fleet"])
        rows.setdefault(key, []).append(res)
        if len(rows[key]) < len(args.seeds):
            continue
        rs = rows[key]
        n = sum(r["rounds"] for r in rs)
        warned = sum((r["warned"] for r in rs), Counter())
        part = "IID" if key[0] == "iid" else f"Dirichlet {key[0]}"
        seeds = " ".join(str(r["seed"]) for r in rs)
        who = ", ".join(f"{d} {c}" for d, c in sorted(warned.items())) or "-"
        accs = " ".join(f"{r['acc']:.3f}" for r in rs)
        info, warn, crit = (sum(r[k] for r in rs) for k in ("info", "warning", "critical"))
        print(f"| {part} | {key[1]} | {seeds} | {n} | {info} | {warn} | {crit} | {100 * warn / max(n, 1):.2f} | {who} | {accs} | "
              f"{sum(r['wall'] for r in rs):.0f} |", flush=True)


def delay_table(args, root: str) -> None:
    print(f"\n## detection delay: Dirichlet 0.5, mixed_fleet, fault from round {FAULT_START} of {args.fault_rounds}\n")
    print("| fault | seed | first loud round | delay (rounds) | fired | warnings before the fault | wall s |")
    print("|---|---:|---:|---:|---|---:|---:|")
    jobs = [(k, seed, args.fault_rounds, root) for k in args.faults for seed in args.seeds]
    for r in _map(fault_run, jobs, args.jobs):
        print(f"| {r['fault']} | {r['seed']} | {r['first'] or '-'} | {'-' if r['delay'] is None else r['delay']} | "
              f"{', '.join(r['fired']) or 'not detected'} | {r['before']} | {r['wall']:.0f} |", flush=True)


def rollback_table(args, root: str) -> None:
    print("## fault: scaling x10 by 30% of clients from round 10, plain mean\n")
    print("| seed | clean acc | faulty acc | diff pp | first rollback | rolled-back rounds | clean run's rolled-back rounds | attacked rounds shipped | wall s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for seed in args.seeds:
        t0 = time.perf_counter()
        clean = fleetlearn.run({**FAULT_CONFIG, "seed": seed, "store": {"root": str(root)}})
        faulty = fleetlearn.run({**FAULT_CONFIG, "seed": seed, "attack": FAULT, "store": {"root": str(root)}})
        rb = [r.round for r in faulty.records if r.status == "rolled_back" and r.round >= 10]
        shipped = sum(1 for r in faulty.records if r.round >= 10 and r.extra.get("malicious") and r.status == "ok")
        print(f"| {seed} | {clean.final_accuracy:.4f} | {faulty.final_accuracy:.4f} | {100 * (faulty.final_accuracy - clean.final_accuracy):+.1f} | "
              f"{rb[0] if rb else '-'} | {sum(r.status == 'rolled_back' for r in faulty.records)} | {sum(r.status == 'rolled_back' for r in clean.records)} | {shipped} | {time.perf_counter() - t0:.0f} |", flush=True)


def canary_table(args, root: str) -> None:
    print("\n## canary: candidate client lr x10\n")
    print("| seed | case | decision | production acc | candidate acc | final acc |")
    print("|---:|---|---|---:|---:|---:|")
    for seed in args.seeds:
        for case, lr, cand in (("worse", 0.1, "client.lr=1.0"), ("better", 0.005, "client.lr=0.05")):
            s = fleetlearn.run({**canary_config(lr, cand), "seed": seed, "store": {"root": str(root)}})
            d = next(r.extra["canary"]["decision"] for r in s.records if "decision" in (r.extra.get("canary") or {}))
            print(f"| {seed} | {case} | {d['decision']} | {d['production']:.4f} | {d['candidate']:.4f} | {s.final_accuracy:.4f} |", flush=True)


TABLES = {"rollback": rollback_table, "canary": canary_table, "false_alarms": false_alarm_table, "delays": delay_table}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tables", nargs="+", choices=list(TABLES), default=list(TABLES))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--partitions", nargs="+", choices=PARTITIONS, default=list(PARTITIONS), help="false alarms: data partitions")
    ap.add_argument("--fleets", nargs="+", choices=FLEETS, default=list(FLEETS), help="false alarms: device profiles")
    ap.add_argument("--rounds", type=int, default=50, help="false alarms: rounds per clean run")
    ap.add_argument("--faults", nargs="+", choices=FAULTS, default=list(FAULTS), help="detection delay: injected faults")
    ap.add_argument("--fault-rounds", type=int, default=20, help=f"detection delay: rounds per run (fault from round {FAULT_START})")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once for the false-alarm and delay tables")
    args = ap.parse_args(argv)
    if args.fault_rounds <= FAULT_START:
        ap.error(f"--fault-rounds must be > {FAULT_START}")
    torch.set_num_threads(1)
    root = tempfile.mkdtemp(prefix="fleetlearn-ops-")
    for name in args.tables:
        TABLES[name](args, root)


if __name__ == "__main__":
    main()
