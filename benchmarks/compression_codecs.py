"""Throughput of every codec chain on one core.

Encodes and decodes a 10M-parameter float32 vector per chain with
``torch.set_num_threads(1)`` and prints: chain, payload bytes, ratio to float32,
encode MB/s, decode MB/s and encode+decode MB/s, all in MB (1e6 bytes) of float32
*input* per second.  Target (issue 3): >= 200 MB/s encode+decode per codec.

    python benchmarks/compression_codecs.py [--dim 10000000] [--repeat 3] [--chains "q8" "topk:0.01 | q8"]

The vector is a heavy-tailed synthetic "update" (Student-t, 3 degrees of
freedom), closer to a model delta than a Gaussian.  Times are the best of
`--repeat` runs after one warm-up run (the warm-up also builds the count
sketch's cached hashes; the cold build time is printed separately).  Wall-clock
throughput is reported, and the last column repeats encode+decode on the
process's CPU time, which is the fairer number on a machine shared with other
jobs (it still counts page faults, which are a large part of the cost here).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from fleetlearn.compression import clear_sketch_cache, parse_chain

DEFAULT_CHAINS = [
    "none",
    "fp16",
    "bf16",
    "q8",
    "q4",
    "q2",
    "q8:stochastic",
    "q4:stochastic",
    "q2:stochastic",
    "sign",
    "topk:0.01",
    "topk:0.1",
    "randk:0.01",
    "randk:0.1",
    "topk:0.01 | q8",
    "topk:0.01 | fp16",
    "topk:0.001 | q4",
    "sketch:0.001,cols=0.01",
    "ef | q4",
    "ef | topk:0.01 | q8",
    "ef | sign",
    "zstd",
    "q8 | zstd",
    "q4 | zstd",
    "topk:0.01 | q8 | zstd",
    "ef | topk:0.01 | q8 | zstd",
]


def best_of(fn, repeat: int) -> tuple[float, float, object]:
    """Best wall-clock and best CPU seconds of `repeat` calls after a warm-up."""
    out = fn()
    wall = cpu = float("inf")
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
    return wall, cpu, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=10_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--chains", nargs="*", default=DEFAULT_CHAINS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    d = args.dim
    rng = np.random.default_rng(0)
    vec = torch.from_numpy((rng.standard_t(3, size=d) * 1e-3).astype(np.float32))
    mb = 4 * d / 1e6
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {d:,} float32 ({mb:.0f} MB), 1 thread, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cpus visible, load average {load:.1f}")
    cols = ["chain", "bytes", "ratio", "enc MB/s", "dec MB/s", "enc+dec MB/s", "enc+dec MB/s (CPU time)", "rel. L2 err"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for spec in args.chains:
        chain = parse_chain(spec)
        note = ""
        if "sketch" in spec:
            clear_sketch_cache()
            t = time.perf_counter()
            chain.encode(vec, None)
            note = f" (cold: first encode {time.perf_counter() - t:.2f} s builds the hash cache)"
        state: dict = {}

        def enc():
            return chain.encode(vec, dict(state) if chain.ef else None)[0]

        te, ce, payload = best_of(enc, args.repeat)
        td, cd, out = best_of(lambda: chain.decode(payload), args.repeat)
        err = float(torch.linalg.vector_norm(out - vec) / torch.linalg.vector_norm(vec))
        print(f"| `{chain.spec}` | {len(payload):,} | {4 * d / len(payload):.1f}x | {mb / te:,.0f} | {mb / td:,.0f} | "
              f"{mb / (te + td):,.0f} | {mb / (ce + cd):,.0f} | {err:.3f} |{note}")


if __name__ == "__main__":
    main()
