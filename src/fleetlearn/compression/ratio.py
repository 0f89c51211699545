"""`chain_for_ratio`: the uplink chain ``[compression] target_ratio`` runs (see `budget`)."""

from __future__ import annotations

import math

from .codec import parse_chain

RATIO_BLOCKS = (16, 8, 4, 1)  # block sizes `chain_for_ratio` tries, most preferred first
# The value codecs of the chains target_ratio builds: 2-bit, unbiased (BENCHMARKS.md, compression).
COVERAGE_VALUES = "q2:dither"  # subset: subtractive dither, the least variance (nothing feeds the error back)
EF_VALUES = "q2:stochastic"  # block top-k: error feedback carries the error; dither measured no better there


HEAD_SHARE = 0.25  # the output layer is always sent when its values take at most this share of the budget


def head_size(spec) -> int:
    """Entries of a model's output layer when they end its flat vector (the tensors sharing
    the last tensor's module path, as FedPer's "last" head), else 0."""
    layer = set(spec.last_layer())
    n = 0
    for name, size in zip(reversed(spec.names), reversed(spec.sizes)):
        if name not in layer:
            break
        n += size
    return n if n < spec.dim else 0


def chain_for_ratio(ratio: float, dim: int, coverage: bool = True, head: int = 0) -> str:
    """The uplink chain ``[compression] target_ratio = ratio`` runs for a model of `dim`
    parameters, with a byte budget of 4 dim / ratio bytes per update (so the ratio holds for
    every update), unbiased 2-bit values and zstd:

    - `coverage` (the run's aggregation is the plain weighted mean: `config.coverage_refusal`):
      ``subset | q2:dither``, random blocks named by a seed and averaged per coordinate over
      the clients that sent them; with ``keep=head`` (`head`: the output layer's entries at
      the end of the vector, `head_size`) when the head's values take at most `HEAD_SHARE`
      of the budget: it is then sent by every client;
    - otherwise ``ef | topk | q2:stochastic``: error feedback and block top-k, which every
      aggregation rule can take.

    (BENCHMARKS.md, "The server's side of a `target_ratio` uplink": at 100x, over twelve
    seeds, subset ends -0.14 pp from float32 on the digits job and -0.29 pp on Fashion-MNIST,
    with keep; block top-k -1.28 and -0.95.)"""
    if not (math.isfinite(ratio) and ratio > 1):
        raise ValueError(f"target_ratio must be a finite number > 1, got {ratio!r}")
    budget = int(4 * dim // ratio)
    values = COVERAGE_VALUES if coverage else EF_VALUES
    keep = f",keep={head}" if coverage and head > 0 and parse_chain(values).value.nbytes(head) <= HEAD_SHARE * budget else ""
    best = None
    for block in RATIO_BLOCKS:
        if block > 1 and dim < 8 * block:
            continue
        opt = f",block={block}" if block > 1 else ""
        support = f"subset:1.0{opt}{keep}" if coverage else f"ef | topk:1.0{opt}"
        spec = f"{support} | {values} | zstd | budget:{max(budget, 1)}"
        smallest = parse_chain(f"{'subset' if coverage else 'topk'}:{block}{opt} | {values}").estimate_bytes(dim)  # one block, uncompressed: an upper bound
        if smallest <= budget:
            return spec
        best = smallest if best is None else min(best, smallest)
    raise ValueError(f"target_ratio = {ratio:g} needs updates of at most {budget} bytes for this model ({dim:,} parameters, "
                     f"{4 * dim:,} bytes as float32); its smallest payload takes about {best} bytes, so the largest ratio it "
                     f"can reach is about {4 * dim / max(best or 1, 1):.0f}")
