"""Aggregation throughput: FedAvg at memory speed, and the robust rules against Flower's.

    python benchmarks/aggregation.py                     # both parts, on the CPU
    python benchmarks/aggregation.py --no-fedavg         # the robust rules only
    python benchmarks/aggregation.py --threads 1 2       # robust rows at 1 and at 2 torch threads
    python benchmarks/aggregation.py --device cuda       # on the GPU (no Flower columns)
    FLOWER_VENV=/path/to/venv python benchmarks/aggregation.py   # another Flower environment

FedAvg (issue 9): the weighted mean of a (100, 10M) float32 matrix reads its 4 GB
at >= 50% of the machine's memory bandwidth, measured in the same run by a plain
copy of a same-sized buffer.  GB/s is bytes of updates read per second; the copy
row counts read + write (STREAM convention).

Robust rules (issue 19): on a (20, 1M) float32 matrix (seeded normal rows, four of
them scaled x5 so that Krum has outliers to leave out), fleetlearn's median,
trimmed mean (beta = 0.1) and Krum (f = 4) must each be

  * >= 5x faster than Flower's ``flwr.server.strategy.aggregate`` functions
    ``aggregate_median``, ``aggregate_trimmed_avg(proportiontocut=0.1)`` and
    ``aggregate_krum(num_malicious=4, to_keep=0)`` on the same matrix,
  * equal to them (max |diff| <= 1e-6), and
  * within 4x of a plain copy of the matrix (into a preallocated buffer, same threads).

Multi-Krum (``to_keep = 16``) is compared too, without a target; Bulyan, the
geometric median (10 Weiszfeld iterations), norm-bounded mean and centered clipping
are timed against the copy only.  Both sides get the same matrix: it is generated
once, saved as .npy, and Flower runs in its own virtual environment (DEFAULT_VENV of
vs_flower.py, or $FLOWER_VENV) in a subprocess that loads it, times each call with
the same policy (one warm-up, then the best of --repeats) and saves its results for
the equality check.  Without that environment the Flower columns are left out.

Timings only count on a quiet machine (1-minute load average under 0.5); the load
is printed before and after each part, with a warning when it is above that.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
QUIET_LOAD = 0.5
TARGET_SPEEDUP, TARGET_X_COPY, TARGET_DIFF = 5.0, 4.0, 1e-6


def best_time(fn, repeats: int, sync=lambda: None) -> float:
    """One warm-up (first touch of fresh pages is not bandwidth), then the best of `repeats`."""
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def load_report(when: str) -> float:
    """Print `uptime` (and a warning when the 1-minute load is too high to count); returns the load."""
    load = os.getloadavg()[0]
    try:
        up = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        up = "load average: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"[uptime {when}] {up}", flush=True)
    if load >= QUIET_LOAD:
        print(f"WARNING: 1-minute load average {load:.2f} >= {QUIET_LOAD}: the machine is busy and these timings do not count",
              flush=True)
    return load


# -- the Flower side (runs in Flower's environment: numpy and flwr only) ------------------------------
FLOWER_RULES = {
    "median": lambda agg, res, f, m: agg.aggregate_median(res),
    "trimmed_mean": lambda agg, res, f, m: agg.aggregate_trimmed_avg(res, 0.1),
    "krum": lambda agg, res, f, m: agg.aggregate_krum(res, num_malicious=f, to_keep=0),
    "multi_krum": lambda agg, res, f, m: agg.aggregate_krum(res, num_malicious=f, to_keep=m),
}


def flower_side(tmp: Path, f: int, m: int, repeats: int) -> None:
    import flwr
    from flwr.server.strategy import aggregate as agg

    x = np.load(tmp / "x.npy")
    results = [([row], 1) for row in x]  # one single-layer model per client, equal example counts
    out = {"flwr": flwr.__version__, "numpy": np.__version__, "load_before": os.getloadavg()[0], "seconds": {}}
    for name, call in FLOWER_RULES.items():
        out["seconds"][name] = best_time(lambda: call(agg, results, f, m), repeats)
        np.save(tmp / f"flower_{name}.npy", np.asarray(call(agg, results, f, m)[0]))
    out["load_after"] = os.getloadavg()[0]
    (tmp / "flower.json").write_text(json.dumps(out))


def run_flower(python: Path, tmp: Path, f: int, m: int, repeats: int) -> dict | None:
    if not python.exists():
        print(f"Flower columns left out: no Flower environment at {python.parent.parent} "
              f"(create it with benchmarks/vs_flower.py, or point $FLOWER_VENV at one)", flush=True)
        return None
    load_report("before Flower")
    proc = subprocess.run([str(python), __file__, "--side", "flower", "--tmp", str(tmp), "--f", str(f), "--m", str(m),
                           "--repeats", str(repeats)], capture_output=True, text=True)
    load_report("after Flower")
    if proc.returncode != 0:
        print(f"Flower columns left out: the Flower run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
        return None
    res = json.loads((tmp / "flower.json").read_text())
    res["results"] = {name: np.load(tmp / f"flower_{name}.npy") for name in FLOWER_RULES}
    return res


# -- the fleetlearn side ------------------------------------------------------------------------------
def fedavg_part(args, device) -> None:
    import torch

    from fleetlearn.aggregation import StreamingMean, mean

    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    gen = torch.Generator(device=device).manual_seed(0)
    n, d = args.n, args.d
    load_report("before FedAvg")
    print(f"FedAvg: device {device}, {torch.get_num_threads()} threads; allocating ({n}, {d:,}) float32 = {n * d * 4 / 1e9:.1f} GB",
          flush=True)
    matrix = torch.empty(n, d, device=device).uniform_(-1, 1, generator=gen)
    weights = torch.rand(n, device=device, generator=gen) * 100 + 1
    nbytes = matrix.numel() * matrix.element_size()
    dst = torch.empty_like(matrix)
    t_copy = best_time(lambda: dst.copy_(matrix), args.repeats, sync)
    del dst
    t_mean = best_time(lambda: mean(matrix, weights), args.repeats, sync)
    ref = (weights.double() / weights.double().sum()) @ matrix[:, :100_000].double()
    err = float((mean(matrix, weights)[:100_000].double() - ref).abs().max())
    assert err < 1e-5, f"mean disagrees with float64 reference by {err}"
    rows = [("copy (read + write)", t_copy, 2 * nbytes, "memory bandwidth"), ("mean (FedAvg)", t_mean, nbytes, "")]
    if not args.no_streaming:
        def streaming():
            acc = StreamingMean(d)
            acc.sum = acc.sum.to(device)
            for row, w in zip(matrix, weights.tolist()):
                acc.add(row, w)
            return acc.result()

        rows.append(("StreamingMean fold", best_time(streaming, 1, sync), nbytes, "one row at a time"))
    del matrix
    load_report("after FedAvg")
    copy_bw = 2 * nbytes / t_copy / 1e9
    print(f"\n{'aggregator':<22} {'shape':>14} {'seconds':>9} {'GB/s':>8} {'% of copy':>10}  note")
    for name, seconds, b, note in rows:
        gbs = b / seconds / 1e9
        print(f"{name:<22} {f'{n} x {d:,}':>14} {seconds:9.4f} {gbs:8.2f} {100 * gbs / copy_bw:9.0f}%  {note}")
    ratio = (nbytes / t_mean / 1e9) / copy_bw
    print(f"FedAvg mean reads at {100 * ratio:.0f}% of copy bandwidth: {'PASS' if ratio >= 0.5 else 'FAIL'} (target >= 50%)\n")


def robust_part(args, device, threads: list[int]) -> bool:
    import torch

    from fleetlearn.aggregation import (
        bulyan,
        centered_clipping,
        geometric_median,
        krum,
        median,
        norm_bounded_mean,
        trimmed_mean,
    )
    from vs_flower import DEFAULT_VENV

    n, d, f = args.robust_n, args.robust_d, args.f
    m = n - f
    x_np = np.random.default_rng(args.seed).standard_normal((n, d), dtype=np.float32)
    x_np[:f] *= 5  # outliers for Krum to leave out
    shape = f"{n} x {d:,}"
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        np.save(tmp / "x.npy", x_np)
        flower = None
        if device.type == "cpu" and not args.no_flower:
            venv = Path(os.environ.get("FLOWER_VENV", DEFAULT_VENV)) if args.flower_venv is None else args.flower_venv
            flower = run_flower(venv / "bin" / "python", tmp, f, m, args.repeats)
        x = torch.from_numpy(np.load(tmp / "x.npy")).to(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    rules = [
        ("median", lambda: median(x)),
        ("trimmed_mean", lambda: trimmed_mean(x, 0.1)),
        ("krum", lambda: krum(x, f)),
        ("multi_krum", lambda: krum(x, f, m)),
        ("bulyan", lambda: bulyan(x, f)),
        ("geometric_median", lambda: geometric_median(x, max_iter=10, ftol=0.0)),
        ("norm_bounded_mean", lambda: norm_bounded_mean(x, 100.0)),
        ("centered_clipping", lambda: centered_clipping(x, 100.0, 3)),
    ]
    labels = {"trimmed_mean": "trimmed_mean 0.1", "krum": f"krum f={f}", "multi_krum": f"multi_krum f={f} m={m}",
              "bulyan": f"bulyan f={f}", "geometric_median": "geometric_median 10 it.", "centered_clipping": "centered_clipping L=3"}
    targets = ("median", "trimmed_mean", "krum")
    all_pass = True
    loads = []
    table = []
    from fleetlearn.aggregation import compiled

    compiled.set_mode(args.kernels)
    if device.type == "cpu" and args.kernels != "numpy":
        # The median and trimmed mean kernels are compiled on first use ("auto": on a background
        # thread, the numpy network answering meanwhile); the timings below are the compiled ones.
        t0 = time.perf_counter()
        median(x), trimmed_mean(x, 0.1)
        first = time.perf_counter() - t0
        compiled.wait()
        print(f"aggregation kernels {args.kernels!r} (compiler {compiled.compiler()}): the first median + trimmed mean "
              f"took {first:.2f} s, both kernels ready {time.perf_counter() - t0:.2f} s after the first call")
    for t in threads:
        torch.set_num_threads(t)
        loads.append(load_report(f"before fleetlearn, {t} thread(s)"))
        dst = torch.empty_like(x)
        t_copy = best_time(lambda: dst.copy_(x), args.repeats, sync)
        del dst
        table.append(("copy", t, t_copy, None, None))
        for name, call in rules:
            seconds = best_time(call, args.repeats, sync)
            diff = None
            if flower is not None and name in flower["results"]:
                out = call().cpu().numpy()
                diff = float(np.abs(out.astype(np.float64) - flower["results"][name].astype(np.float64)).max())
            table.append((name, t, seconds, t_copy, diff))
        loads.append(load_report(f"after fleetlearn, {t} thread(s)"))

    flw = "" if flower is None else f" vs Flower {flower['flwr']} (numpy {flower['numpy']})"
    print(f"\nRobust rules on {shape} float32, device {device}{flw}; best of {args.repeats} after one warm-up; "
          f"median / trimmed mean kernels {args.kernels!r}")
    head = (f"{'rule':<24} {'shape':>12} {'threads':>7} {'fleetlearn s':>12} {'Flower s':>9} {'speed-up':>8} {'x copy':>7} "
            f"{'max |diff|':>10}  verdict")
    print(head)
    print("-" * len(head))
    def cell(value, spec: str, width: int) -> str:
        return f"{value:{width}{spec}}" if value is not None else f"{'-':>{width}}"

    for name, t, seconds, t_copy, diff in table:
        fl_s = flower["seconds"].get(name) if flower is not None else None
        speed = cell(fl_s / seconds if fl_s else None, ".1f", 7) + ("x" if fl_s else " ")
        xcopy = cell(seconds / t_copy if t_copy else 1.0, ".2f", 6) + "x"
        verdict = ""
        if name in targets:
            checks = [seconds / t_copy <= TARGET_X_COPY]
            if flower is not None:
                checks += [fl_s / seconds >= TARGET_SPEEDUP, diff is not None and diff <= TARGET_DIFF]
            ok = all(checks)
            all_pass &= ok
            verdict = ("PASS" if ok else "FAIL") + ("" if flower is not None else " (copy only)")
        print(f"{labels.get(name, name):<24} {shape:>12} {t:>7} {seconds:12.4f} {cell(fl_s, '.3f', 9)} {speed} {xcopy} "
              f"{cell(diff, '.1e', 10)}  {verdict}")
    print(f"targets for median, trimmed mean, krum: >= {TARGET_SPEEDUP:.0f}x Flower, max |diff| <= {TARGET_DIFF:g}, "
          f"<= {TARGET_X_COPY:.0f}x copy: {'all PASS' if all_pass else 'some FAIL'}")
    busy = [v for v in loads + ([flower["load_before"], flower["load_after"]] if flower else []) if v >= QUIET_LOAD]
    if busy:
        print(f"WARNING: the 1-minute load average reached {max(busy):.2f} (>= {QUIET_LOAD}) during this run: "
              "re-measure on a quiet machine before recording these timings")
    return all_pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100, help="clients in the FedAvg matrix")
    p.add_argument("--d", type=int, default=10_000_000, help="parameters in the FedAvg matrix")
    p.add_argument("--robust-n", type=int, default=20)
    p.add_argument("--robust-d", type=int, default=1_000_000)
    p.add_argument("--f", type=int, default=4, help="Byzantine clients assumed by krum / bulyan")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, nargs="+", help="torch threads for the robust rows, one set of rows each "
                   "(default: 1 and all CPUs)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-fedavg", action="store_true", help="skip the (100, 10M) FedAvg part")
    p.add_argument("--no-streaming", action="store_true", help="skip the StreamingMean row")
    p.add_argument("--kernels", choices=["auto", "compiled", "numpy"], default="auto",
                   help="median / trimmed mean kernels ([engine] aggregation_kernels; default: auto)")
    p.add_argument("--no-flower", action="store_true", help="skip the Flower columns")
    p.add_argument("--flower-venv", type=Path, default=None, help="Flower's virtual environment "
                   "(default: $FLOWER_VENV, else vs_flower.py's DEFAULT_VENV)")
    p.add_argument("--side", choices=["flower"], help=argparse.SUPPRESS)
    p.add_argument("--tmp", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--m", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side == "flower":
        flower_side(args.tmp, args.f, args.m, args.repeats)
        return

    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cpus = os.cpu_count() or 1
    threads = args.threads or sorted({1, cpus})
    if not args.no_fedavg:
        torch.set_num_threads(cpus)
        fedavg_part(args, device)
    robust_part(args, device, threads)


if __name__ == "__main__":
    main()
