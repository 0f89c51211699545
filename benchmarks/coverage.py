"""The server's side of a `target_ratio` uplink: decoding a cohort's payloads and averaging by coverage.

    python benchmarks/coverage.py                    # 100 clients, d = 1M, 100x
    python benchmarks/coverage.py --n 200 --d 2000000 --ratio 50

For each chain, `--n` payloads of a Student-t vector of `--d` entries are encoded once
(seeds 0..n-1; not timed), then timed, best of `--repeats`:

* decode: every payload decoded into its row of one (n, d) float32 matrix (what the
  intake does, `decode_payload(..., out=row)`), in ms per client;
* support: `payload_support` of every payload (what averaging by coverage reads), per client;
* aggregate: the pipeline stage on the decoded matrix: `CoverageStage` for `subset`
  chains, the plain weighted mean for the others, in ms for the cohort.

The chains are `chain_for_ratio(--ratio, d)` with and without coverage (what
`[compression] target_ratio` runs: `subset | q2:dither` and `ef | topk | q2:stochastic`).
Peak RSS (the process's, so it includes the matrix: 4 n d bytes) is printed at the end.
Timings only count on a quiet machine (1-minute load average under 0.5); the load is printed.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np
import torch

from fleetlearn.aggregation.mean import mean
from fleetlearn.aggregation.pipeline import Batch, CoverageStage
from fleetlearn.compression.codec import decode_payload, parse_chain, payload_support, seed_state
from fleetlearn.compression.ratio import chain_for_ratio


def best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=100, help="clients in the cohort")
    p.add_argument("--d", type=int, default=1_000_000, help="model parameters")
    p.add_argument("--ratio", type=float, default=100.0, help="target_ratio the chains are made for")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chains", nargs="+", help="chains to time instead of target_ratio's two")
    a = p.parse_args()
    torch.set_num_threads(1)
    chains = a.chains or [chain_for_ratio(a.ratio, a.d, True, 0), chain_for_ratio(a.ratio, a.d, False, 0).removeprefix("ef | ")]
    print(f"# n = {a.n}, d = {a.d:,}, 1 thread, torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}")
    print("| chain | bytes/client | decode ms/client | support ms/client | aggregate ms (cohort) |")
    print("|---|---:|---:|---:|---:|")
    u = torch.from_numpy(np.random.default_rng(0).standard_t(3, a.d).astype(np.float32))
    rows = torch.empty(a.n, a.d)
    w = np.random.default_rng(0).uniform(1, 2, a.n)
    for spec in chains:
        chain = parse_chain(spec)
        payloads = [chain.encode(u + 0.01 * i, seed_state(i))[0] for i in range(a.n)]
        coverage = chain.coverage

        def decode():
            for i, pl in enumerate(payloads):
                decode_payload(pl, dim=a.d, out=rows[i])

        def support():
            for pl in payloads:
                payload_support(pl, a.d)

        stage = CoverageStage(a.d)
        batch = Batch(rows, w, list(range(a.n)), payloads)
        agg = (lambda: stage.next(batch)) if coverage else (lambda: mean(rows, torch.from_numpy(w).float()))
        td, ts, ta = best(decode, a.repeats), best(support, a.repeats), best(agg, a.repeats)
        size = sum(len(pl) for pl in payloads) / a.n
        name = spec.replace("|", "\\|")
        print(f"| `{name}` | {size:,.0f} | {1e3 * td / a.n:.2f} | {1e3 * ts / a.n:.2f} | {1e3 * ta:.0f} |")
    print(f"# peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB "
          f"(the matrix: {4 * a.n * a.d / 2**20:,.0f} MB); load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
