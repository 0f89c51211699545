"""`chain_for_ratio`: the uplink chain ``[compression] target_ratio`` runs (see `budget`)."""

from __future__ import annotations

import math

from .codec import parse_chain

RATIO_BLOCKS = (16, 8, 4, 1)  # block sizes `chain_for_ratio` tries, most preferred first
RATIO_VALUES = "q2:stochastic"  # the value codec of the chain target_ratio builds (unbiased rounding: BENCHMARKS.md, compression)


def chain_for_ratio(ratio: float, dim: int, coverage: bool = True) -> str:
    """The uplink chain ``[compression] target_ratio = ratio`` runs for a model of `dim`
    parameters, with a byte budget of 4 dim / ratio bytes per update (so the ratio holds for
    every update), 2-bit values with stochastic (unbiased) rounding and zstd:

    - `coverage` (the run's aggregation is the plain weighted mean: `config.coverage_refusal`):
      ``subset``, random blocks averaged per coordinate over the clients that sent them;
    - otherwise error feedback and block top-k, which every aggregation rule can take.

    (BENCHMARKS.md, "Random subsets averaged by coverage": at 100x subset ends closer to
    float32 on the digits job and level on Fashion-MNIST, with about twice the spread
    between seeds.)"""
    if not (math.isfinite(ratio) and ratio > 1):
        raise ValueError(f"target_ratio must be a finite number > 1, got {ratio!r}")
    budget = int(4 * dim // ratio)
    best = None
    for block in RATIO_BLOCKS:
        if block > 1 and dim < 8 * block:
            continue
        opt = f",block={block}" if block > 1 else ""
        support = f"subset:1.0{opt}" if coverage else f"ef | topk:1.0{opt}"
        spec = f"{support} | {RATIO_VALUES} | zstd | budget:{max(budget, 1)}"
        smallest = parse_chain(f"{'subset' if coverage else 'topk'}:{block}{opt} | {RATIO_VALUES}").estimate_bytes(dim)  # one block, uncompressed: an upper bound
        if smallest <= budget:
            return spec
        best = smallest if best is None else min(best, smallest)
    raise ValueError(f"target_ratio = {ratio:g} needs updates of at most {budget} bytes for this model ({dim:,} parameters, "
                     f"{4 * dim:,} bytes as float32); its smallest payload takes about {best} bytes, so the largest ratio it "
                     f"can reach is about {4 * dim / max(best or 1, 1):.0f}")
