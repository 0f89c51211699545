"""Order statistics of every column of an ``(n, d)`` matrix, by comparator networks.

The coordinate-wise robust rules (median, trimmed mean, Bulyan's second phase) need,
in every coordinate, which values are the k smallest, the middle ones, or all of them
in order.  Sorting each column is the slow way: d sorts of n values, each with its own
branches.  Here a *comparator network* does it for all coordinates at once: wire ``i``
holds row ``i``'s values for a block of columns, and a comparator ``(i, j)`` is two
elementwise calls, ``wire_i, wire_j = minimum(wire_i, wire_j), maximum(wire_i, wire_j)``,
on contiguous vectors that stay in cache.  The network is Batcher's merge exchange
(any n, ~n log^2 n / 4 comparators), pruned for what the caller needs: a comparator
whose outputs nobody reads is dropped, one with a single output read costs one call,
and when the middle values are wanted as a set (their sum), the last comparators among
them are dropped too.  The median of 20 rows takes 142 elementwise calls per block.

Each column block is ``(n, w)`` with ``n * w`` about `BLOCK_ELEMENTS_CPU` elements
(the wires of a block stay in the L2/L3 cache); on the CPU the calls are numpy
ufuncs, which cost ~0.4 us a call against ~3 us for torch's, and the blocks are shared
among ``torch.get_num_threads()`` threads (the ufuncs release the GIL).  On a GPU the
same code runs with torch's kernels on large blocks.  Above `NETWORK_MAX_N_CPU` (GPU:
`NETWORK_MAX_N_GPU`) rows the network, growing as n log^2 n, gives way to a sort of
each block.

`blocks` and `for_blocks` are also the robust rules' column-block loop.
"""

from __future__ import annotations

import functools
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

# Column-block sizes, in elements of the (n, block) slice.  On the CPU ~1M float32
# elements (4 MB) keeps a block's wires in cache (L2 + L3) while the network runs over
# them; a GPU wants big launches, so it gets large blocks.
BLOCK_ELEMENTS_CPU = 1 << 20
BLOCK_ELEMENTS_GPU = 1 << 26
# Up to this many rows a network beats sorting each block (on the CPU: ~2 ns an element
# at n = 64 against ~8 ns for numpy's vectorised sort).  A GPU pays a kernel launch per
# call, so it sorts earlier.
NETWORK_MAX_N_CPU = 128
NETWORK_MAX_N_GPU = 32
# numpy's ufuncs run the elementwise calls on the CPU; False runs torch's kernels there
# too, the GPU's code path (the tests use it to cover that path without a GPU).
NUMPY_ON_CPU = True


# -- column blocks -------------------------------------------------------------------


def blocks(t: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) column ranges of about the device's block size (in elements of `t`) each."""
    n, d = t.shape
    target = BLOCK_ELEMENTS_CPU if t.device.type == "cpu" else BLOCK_ELEMENTS_GPU
    step = max(1, target // max(n, 1))
    return [(s, min(s + step, d)) for s in range(0, d, step)]


def for_blocks(t: torch.Tensor, work, make_state=lambda: None) -> None:
    """Call ``work(state, start, end)`` for every column block of `t`.

    On the CPU the blocks are shared among up to ``torch.get_num_threads()`` threads,
    each with its own ``make_state()`` (scratch buffers); `work` must write only its own
    columns and should spend its time in calls that release the GIL (numpy ufuncs).
    Elsewhere, and for a single block, everything runs on the calling thread.  numpy's
    warnings about overflow and NaN are silenced: the callers check the data for NaN and
    inf from what the pass computed, and raise their own error."""
    spans = blocks(t)
    workers = min(torch.get_num_threads(), len(spans)) if t.device.type == "cpu" else 1
    pending = iter(spans)
    lock = threading.Lock()

    def run() -> None:
        state = make_state()
        with np.errstate(all="ignore"):
            while True:
                with lock:
                    span = next(pending, None)
                if span is None:
                    return
                work(state, *span)

    if workers <= 1:
        run()
        return
    with ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(run) for _ in range(workers)]:
            future.result()


# -- the elementwise backend ---------------------------------------------------------


class Kernels:
    """The matrix and the library that runs the elementwise calls on it: numpy views on
    the CPU (no copy), torch elsewhere.  Both take the same ``minimum(a, b, out=)``,
    ``maximum``, ``add``, ``where``, ``sort``."""

    def __init__(self, t: torch.Tensor):
        self.cpu = t.device.type == "cpu" and NUMPY_ON_CPU
        self.lib = np if self.cpu else torch
        self.data = t.detach().numpy() if self.cpu else t
        self.device = t.device
        self.network_max_n = NETWORK_MAX_N_CPU if self.cpu else NETWORK_MAX_N_GPU

    def view(self, t: torch.Tensor):
        """A tensor on the same device as the kernels' array type (numpy views on the CPU)."""
        return t.detach().numpy() if self.cpu else t

    def empty(self, shape, wide: bool = False, integer: bool = False):
        """Scratch: the data's dtype, float64 (`wide`) or int64 (`integer`)."""
        if self.cpu:
            dtype = np.int64 if integer else np.float64 if wide else self.data.dtype
            return np.empty(shape, dtype=dtype)
        dtype = torch.int64 if integer else torch.float64 if wide else self.data.dtype
        return torch.empty(shape, dtype=dtype, device=self.device)

    def sorted_rows(self, rows: list[int], s: int, e: int):
        """Rows `rows` of columns s:e, each column sorted ascending, as an (len(rows), e - s) array."""
        if self.cpu:
            return np.sort(self.data[rows, s:e], axis=0)
        return torch.sort(self.data[rows, s:e], dim=0).values


# -- comparator networks -------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def sorting_network(n: int) -> tuple[tuple[int, int], ...]:
    """Batcher's merge exchange for n inputs (Knuth, TAOCP vol. 3, 5.2.2, Algorithm M):
    comparators ``(i, j)``, ``i < j``, each putting the smaller value on wire i, that sort
    any input.  n log^2 n / 4 comparators, for any n (not only powers of two)."""
    out: list[tuple[int, int]] = []
    if n < 2:
        return ()
    t = (n - 1).bit_length()
    p = 1 << (t - 1)
    while p > 0:
        q, r, d = 1 << (t - 1), 0, p
        while True:
            out.extend((i, i + d) for i in range(n - d) if i & p == r)
            if q == p:
                break
            d, q, r = q - p, q >> 1, p
        p >>= 1
    return tuple(out)


@functools.lru_cache(maxsize=None)
def network_program(n: int, lo: int, hi: int, ordered: bool) -> tuple[tuple[int, int, bool, bool], ...]:
    """The comparators of `sorting_network(n)` that decide the values on wires lo..hi-1:
    ``(i, j, keep_min, keep_max)`` (a comparator whose min or max output is never read
    computes only the other).

    Unless `ordered`, the wanted values are needed as a set, so a comparator between two
    wanted wires that no later comparator touches (it only permutes the set) is dropped
    first.  Then, from the end, a comparator neither of whose outputs is read is dropped.
    The wires lo..hi-1 end holding the (lo+1)-th to hi-th smallest values, in order if
    `ordered`."""
    net = sorting_network(n)
    if not ordered:
        touched: set[int] = set()
        kept = []
        for i, j in reversed(net):
            if lo <= i and j < hi and i not in touched and j not in touched:
                continue
            kept.append((i, j))
            touched.update((i, j))
        net = tuple(reversed(kept))
    live = set(range(lo, hi))
    program = []
    for i, j in reversed(net):
        keep_min, keep_max = i in live, j in live
        if keep_min or keep_max:
            program.append((i, j, keep_min, keep_max))
            live.update((i, j))
    return tuple(reversed(program))


@functools.lru_cache(maxsize=None)
def network_schedule(n: int, lo: int, hi: int, ordered: bool) -> tuple[tuple[tuple[bool, int, int, int], ...], tuple[int, ...]]:
    """`network_program` with its buffers assigned once: ``(steps, outputs)``.

    Slots 0..n-1 are the input vectors (read, never written), slots n..2n the n + 1
    scratch rows.  A step ``(is_min, a, b, out)`` is ``minimum`` (else ``maximum``) of
    slots a and b into slot out; `outputs` are the slots that end holding wires
    lo..hi-1.  A comparator computing both outputs writes its min to a free row and its
    max over an input it owns (elementwise, so in place is safe)."""
    slot = list(range(n))  # the slot holding each wire's current value
    free = list(range(2 * n, n - 1, -1))  # scratch rows not in use, popped from the end
    steps = []
    for i, j, keep_min, keep_max in network_program(n, lo, hi, ordered):
        a, b = slot[i], slot[j]
        assert a >= 0 and b >= 0, "a comparator reads a wire no longer live"
        owned_a, owned_b = a >= n, b >= n
        if keep_min and keep_max:
            low = free.pop()
            high = b if owned_b else a if owned_a else free.pop()
            steps += [(True, a, b, low), (False, a, b, high)]
            if owned_a and owned_b:
                free.append(a)
            slot[i], slot[j] = low, high
        else:
            keep, drop = (i, j) if keep_min else (j, i)
            out = a if owned_a else b if owned_b else free.pop()
            steps.append((keep_min, a, b, out))
            if slot[drop] >= n and slot[drop] != out:
                free.append(slot[drop])
            slot[keep], slot[drop] = out, -1
    return tuple(steps), tuple(slot[lo:hi])


def run_network(schedule, inputs: list, scratch, lib) -> list:
    """Run a `network_schedule` on `inputs` (one vector per wire) with `scratch` (n + 1
    rows of the inputs' length); returns the vectors of the wanted wires."""
    steps, outputs = schedule
    slots = list(inputs) + list(scratch)
    minimum, maximum = lib.minimum, lib.maximum
    for is_min, a, b, out in steps:
        (minimum if is_min else maximum)(slots[a], slots[b], out=slots[out])
    return [slots[o] for o in outputs]


def order_statistics(k: Kernels, scratch, s: int, e: int, lo: int, hi: int, ordered: bool, rows=None) -> list:
    """The (lo+1)-th to hi-th smallest values of every column in s:e (of `rows`, default
    all rows), as hi - lo vectors: ordered by rank if `ordered`, else as a set (their
    order unspecified).  `scratch` is an ``(n + 1, >= e - s)`` buffer; the vectors may be
    views of it or of the data, valid until it is reused."""
    rows = list(range(k.data.shape[0])) if rows is None else list(rows)
    n = len(rows)
    if n <= k.network_max_n:
        schedule = network_schedule(n, lo, hi, ordered)
        return run_network(schedule, [k.data[r, s:e] for r in rows], scratch[: n + 1, : e - s], k.lib)
    srt = k.sorted_rows(rows, s, e)
    return [srt[p] for p in range(lo, hi)]
