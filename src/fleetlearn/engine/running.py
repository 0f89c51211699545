"""What runs around the rounds: the synchronous driver (`SyncRounds`), the checks before
a round (clients ready, privacy budget left), and what a run sets for its duration
(torch's intra-op threads, the monitoring endpoint, the process's heap)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import ctypes
import ctypes.util
import functools
import gc
import math
import os
import sys
import threading

import torch

from ..aggregation import compiled as compiled_kernels
from ..config import AUTO_THREADS_MAX_DIM, run_threads  # noqa: F401 - run_threads is read from here too
from ..params import HEAP_BLOCK_MAX
from ..records import RoundRecord


class _OutermostRun:
    """A process-wide setting a run makes for its duration: runs that nest or overlap in one
    process share it, applied by the first to start (`_apply`) and undone by the last to
    finish (`_undo`).  Each subclass keeps its own count of the runs inside it."""

    _depth = 0
    _lock = threading.Lock()

    def __enter__(self):
        cls = type(self)
        with cls._lock:
            if cls._depth == 0:
                self._apply()
            cls._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        cls = type(self)
        with cls._lock:
            cls._depth -= 1
            if cls._depth == 0:
                self._undo()

    def _apply(self) -> None:
        raise NotImplementedError

    def _undo(self) -> None:
        raise NotImplementedError


class FrozenHeap(_OutermostRun):
    """While a run executes, what the process held before it (the model, the data, torch's
    and the imports' objects) is left out of Python's cyclic garbage collection
    (`gc.freeze`), and so is what survives the run's first round (the modules and kernels
    its first training imports or compiles); all of it goes back to the collector when the
    run ends (`gc.unfreeze`).  Each full collection otherwise walks it all again: 0.16-0.23 s,
    once every few rounds, in a 1000-client digits run whose round takes 0.18 s
    (benchmarks/vs_flower.py).  Runs that nest or overlap in one process share one freeze,
    undone by the last to finish.  A process that froze its heap itself (`gc.freeze` before
    forking workers, say) keeps its freeze: the run then freezes and unfreezes nothing.
    Only reference cycles among frozen objects that die during the run (or were dead, not
    yet collected, when frozen: at most the first round's) wait for the end of the run;
    everything else is freed as before."""

    _depth = 0
    _owned = False  # whether the outermost run froze the heap (and so unfreezes it)

    def __init__(self):
        self.rounds = 0

    def _apply(self) -> None:
        FrozenHeap._owned = gc.get_freeze_count() == 0
        if FrozenHeap._owned:
            gc.freeze()

    def _undo(self) -> None:
        if FrozenHeap._owned:
            gc.unfreeze()
            FrozenHeap._owned = False

    def round_done(self) -> None:
        """After each round: the first one's survivors are frozen too."""
        self.rounds += 1
        if self.rounds == 1:
            with FrozenHeap._lock:
                if FrozenHeap._depth > 0 and FrozenHeap._owned:
                    gc.freeze()

    def after_rounds(self, on_round: Callable[[RoundRecord], Any] | None) -> Callable[[RoundRecord], Any]:
        """`on_round` (may be None) with `round_done` called first."""

        def call(record: RoundRecord) -> Any:
            self.round_done()
            return None if on_round is None else on_round(record)

        return call


# glibc's mallopt parameters (malloc.h) and their defaults
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_TRIM_DEFAULT, _MMAP_DEFAULT = 128 << 10, 128 << 10
RETAINED_MAX = 1 << 30  # the most free heap a run keeps for its next round (bytes)
MMAP_FROM = HEAP_BLOCK_MAX  # blocks at least this large still come from (and go back to) the kernel directly


@functools.lru_cache(maxsize=1)
def _glibc():
    """glibc's C library, or None (another C library, another OS)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only: musl and others have other allocators
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


class RetainedHeap(_OutermostRun):
    """While a run executes, glibc's allocator keeps up to `nbytes` of freed memory for the
    next round instead of handing it back to the kernel after every round.  A round
    allocates and frees the same memory again and again (a 1000-client digits round: 38 MB
    of payloads, as many of decoded rows, torch's intermediate tensors); returned to the
    kernel, each round faults it all in again, page by page: a 1000-client round of
    vs_flower.py's workload took 219 ms that way and 184 ms with the memory kept, its
    encoding 24.9 and 16.5 ms (benchmarks/allocator.py, architecture 8.10).  Blocks up to
    `MMAP_FROM` come from the heap (glibc's own adaptive rule reaches the same bound); the
    run's end puts glibc's defaults (or the
    process's MALLOC_*_ environment) back and returns what is free (`malloc_trim`); glibc's
    adaptive thresholds, which any `mallopt` turns off, stay off in that process.  Only
    with glibc; elsewhere nothing changes.  Nested runs keep the outermost run's setting."""

    _depth = 0

    def __init__(self, nbytes: int):
        self.nbytes = int(min(RETAINED_MAX, max(_TRIM_DEFAULT, nbytes)))

    @staticmethod
    def for_run(c) -> "RetainedHeap":
        """What one round of `c` allocates and frees, twice over: its dispatched cohort's
        float32 updates (payloads and decoded rows)."""
        srv = c.config.server
        cohort = math.ceil(srv.cohort * srv.over_selection)
        return RetainedHeap(4 * cohort * 4 * int(c.dim))

    def _apply(self) -> None:
        if (libc := _glibc()) is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, MMAP_FROM)
            libc.mallopt(_M_TRIM_THRESHOLD, self.nbytes)

    def _undo(self) -> None:
        if (libc := _glibc()) is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, _env_int("MALLOC_MMAP_THRESHOLD_", _MMAP_DEFAULT))
            libc.mallopt(_M_TRIM_THRESHOLD, _env_int("MALLOC_TRIM_THRESHOLD_", _TRIM_DEFAULT))
            libc.malloc_trim(0)


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return default


@contextmanager
def running(c) -> Iterator[FrozenHeap]:
    """While a run executes: its torch threads (`engine.threads`), its aggregation
    kernels (`engine.aggregation_kernels`), its monitoring (Prometheus endpoint), the
    memory its rounds free kept for the next (`RetainedHeap`) and a frozen heap
    (`FrozenHeap`, yielded: the driver calls its `round_done` after each round); all are
    put back afterwards."""
    threads_before = torch.get_num_threads()
    threads = run_threads(c.config.engine.threads, c.dim)
    if threads:
        torch.set_num_threads(threads)
    kernels_before = compiled_kernels.set_mode(c.config.engine.aggregation_kernels)
    if c.monitoring is not None:
        c.monitoring.start()
    try:
        with RetainedHeap.for_run(c), FrozenHeap() as heap:
            yield heap
    finally:
        if c.monitoring is not None:
            c.monitoring.stop()
        compiled_kernels.set_mode(kernels_before)
        torch.set_num_threads(threads_before)


def sampling(selector, available, want: int) -> tuple[str, float]:
    """How this round's cohort is drawn from `available`: the selector's (kind,
    per-client inclusion probability).  The accountant composes exactly this; a
    selector that is not uniform says None and counts as every client in every
    round (no amplification; central DP refuses such selectors at build time)."""
    inc = selector.inclusion(available, want) if len(available) and want > 0 else None
    return inc if inc is not None else ("poisson", 1.0)


def clients_ready(c) -> bool:
    """Before a round: wait for `c.wait_for_clients` = (min clients, timeout s) when set.
    If they do not come, the run stops (`stopped_reason` says why) instead of recording
    rounds that end with nobody: waiting for clients never uses up rounds, and the run
    can be resumed."""
    if c.wait_for_clients is None:
        return True
    need, timeout = c.wait_for_clients
    got = len(c.transport.wait_available(need, timeout))
    if got >= need:
        c._pool = None  # the pool is read after the wait
        return True
    c.stopped_reason = (
        f"waited {timeout:g} s for {need} connected clients before round {c.round + 1}, {got} connected; "
        "no round was run (resume the run when clients are back)"
    )
    return False


def budget_exhausted(c) -> bool:
    """True (and `c.stopped_reason` set) when the next round, at the sampling rate of the
    pool it will draw from, would take the privacy spent past its budget: the run
    stops cleanly before that round."""
    if c.privacy is None or c.privacy.settings.budget_epsilon is None:
        return False
    srv = c.config.server
    available = c.round_pool(c.round + 1)
    want = min(math.ceil(srv.cohort * srv.over_selection), len(available))
    kind, q = sampling(c.selector, available, want)
    reason = c.privacy.budget_stop_reason(q, kind)
    if reason is not None:
        c.stopped_reason = reason
    return reason is not None


class SyncRounds:
    """The synchronous driver: one round after another until `server.rounds`, each after
    the clients are ready (`clients_ready`) and while the privacy budget allows it."""

    def __init__(self, coordinator):
        self.c = coordinator

    def run(self, on_round: Callable[[RoundRecord], Any] | None = None) -> None:
        c = self.c
        while c.round < c.config.server.rounds:
            if not clients_ready(c) or budget_exhausted(c):
                break
            record = c.run_round()
            if on_round is not None:
                on_round(record)
