"""A byte budget per update: the ``budget:N`` chain element, and `chain_for_ratio`.

``budget:N`` (last in a chain with a sparsifier, e.g. ``"ef | topk:0.2,block=16 | q2 |
zstd | budget:384"``) makes every payload at most N bytes: the encoder keeps the most
entries (whole blocks for block top-k) whose payload fits, searching the sparsifier's
count from the client's last choice (kept in its codec state under ``"budget.k"``) and
never above the chain's own amount.  Sizes are measured, not estimated, so an entropy
coder's gain is spent on more entries instead of being left on the table.  The
payload is an ordinary one: any build decodes it.

`compression.ratio.chain_for_ratio(ratio, dim)` is what ``[compression] target_ratio`` runs: the budget
4 d / ratio bytes (the float32 update over the ratio) on ``subset | block=16 | q2:dither |
zstd`` where the run averages with the plain mean, else ``ef | topk | block=16 | q2:stochastic |
zstd`` (BENCHMARKS.md, "Random subsets averaged by coverage"); models too small for blocks of
16 take blocks of 8, 4, then single entries.  A ratio the model cannot reach (one block's payload is over the
budget) is a ValueError that says the largest ratio it can.
"""

from __future__ import annotations

import math

from .base import Stage, parse_int

BUDGET_STATE = "budget.k"  # the entries kept in the client's last budgeted payload (int64 scalar)


MAX_TRIES = 12  # encodes per update at most (a cold start: about log2 of the count range)


class ByteBudget(Stage):
    """``budget:N``: every payload of the chain at most N bytes (see the module docstring)."""

    name = "budget"
    lossy = False
    role = "budget"
    MAX_BYTES = 1 << 31

    def __init__(self, max_bytes: int):
        if not 1 <= int(max_bytes) <= self.MAX_BYTES:
            raise ValueError(f"codec 'budget': {max_bytes!r} bytes is not allowed; N must be an integer in [1, {self.MAX_BYTES}]")
        self.max_bytes = int(max_bytes)

    def args(self):
        return [str(self.max_bytes)]

    @classmethod
    def from_args(cls, positional, options):
        if len(positional) != 1 or options:
            given = ",".join(positional + [f"{k}={v}" for k, v in options.items()]) or "nothing"
            raise ValueError(f"codec 'budget' takes one argument, the most bytes a payload may have (budget:384); got {given!r}")
        return cls(parse_int("budget", "N (bytes)", positional[0], 1, cls.MAX_BYTES))


def fit(encode, k_max: int, unit: int, budget: int, start: int, warm: bool) -> tuple[bytes, int]:
    """The payload of the largest count k (a multiple of `unit`, at most `k_max`) whose
    `encode(k)` fits in `budget` bytes, within 3 % of the best count, searched from
    `start` (`warm`: the count that fitted last time, so the search steps by 5 %; else an
    estimate, stepping by 25 %).  Returns (payload, k).  ValueError when even one unit
    does not fit."""
    n_max = max(1, -(-k_max // unit))
    sizes: dict[int, bytes] = {}

    def trial(n: int) -> bool:
        if n not in sizes:
            sizes[n] = encode(min(k_max, n * unit))
        return len(sizes[n]) <= budget

    lo, hi = 0, n_max + 1  # lo fits (0: none known), hi does not (n_max + 1: none known)
    n = min(n_max, max(1, int(start) // unit))
    step = 1.05 if warm else 1.25
    while len(sizes) < MAX_TRIES:
        if trial(n):
            lo = n
            if n == n_max:
                break
        else:
            hi = n
            if n == 1:
                break
        if hi - lo <= max(1, int(lo * 0.03)):
            break
        if hi > n_max:  # nothing too big seen yet: step up
            n = min(n_max, max(lo + 1, math.ceil(lo * step)))
        elif lo == 0:  # nothing fits yet: step down
            n = max(1, hi // 2)
        else:
            n = (lo + hi) // 2
    if lo == 0:
        smallest = len(sizes[1]) if 1 in sizes else None
        raise ValueError(f"codec 'budget:{budget}': no payload fits"
                         + (f" (the smallest, one {'block' if unit > 1 else 'entry'}, takes {smallest} bytes)" if smallest else ""))
    return sizes[lo], min(k_max, lo * unit)
