"""The coordinate-wise middle mean (median, trimmed mean) as one compiled CPU loop.

`networks` runs a comparator network as ~150 numpy calls per column block: every call
streams two vectors through the cache and writes a third, so on a (20, 1M) matrix the
median costs ~4x a copy of the matrix.  The same network written as straight-line torch
code and compiled with ``torch.compile`` (inductor's C++ backend) becomes one loop over
the columns that keeps a column's n values in registers: each value is read from memory
once and the ~150 comparators are vector min/max instructions.  On this project's 2-core
Intel machine that is ~6x faster than the numpy network and close to a plain copy.  The
results are the numpy network's, bit for bit: the same comparators, and the middle values
summed in float64 in the same order.

Compiling costs seconds (the first kernel in a process also pays for loading inductor;
the kernels are cached on disk by torch, so a later process compiles faster), and every
distinct (rows, trimmed, dtype) needs its own kernel.  So the mode decides when it pays:

- ``"auto"`` (the default, `[engine] aggregation_kernels`): matrices of at least
  `AUTO_MIN_ELEMENTS` elements on the CPU, when a C++ compiler is installed.  The kernel
  is compiled on a background thread; until it is ready the numpy network answers, so a
  round never waits for the compiler (rounds run slower meanwhile: it holds the GIL).
- ``"compiled"``: every CPU matrix, compiled on first use (the caller waits).
- ``"numpy"``: never.

A kernel whose compilation fails is not tried again (the numpy network answers; a
warning says why once).  Each kernel is generated as its own function (its own code
object), so torch's per-function recompilation limit is never reached however many
cohort sizes a run meets.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from ..toolchain import compiler
from .networks import NETWORK_MAX_N_CPU, network_schedule

log = logging.getLogger(__name__)

MODES = ("auto", "compiled", "numpy")
AUTO_MIN_ELEMENTS = 1 << 24  # "auto": ~16.8M elements (e.g. 20 x 840k) and up; below, the numpy network takes < ~45 ms

_mode = "auto"
_lock = threading.Lock()
_kernels: dict[tuple, Future] = {}
_failed: set[tuple] = set()
_compile_lock = threading.Lock()


def set_mode(mode: str) -> str:
    """Set the mode for this process; returns the previous one."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"aggregation_kernels: allowed: {', '.join(MODES)}; got {mode!r}")
    before, _mode = _mode, mode
    return before


def get_mode() -> str:
    return _mode


@contextmanager
def mode(m: str) -> Iterator[None]:
    """Use mode `m` inside the block (a run sets its `[engine] aggregation_kernels`)."""
    before = set_mode(m)
    try:
        yield
    finally:
        set_mode(before)


def _source(n: int, lo: int, hi: int) -> str:
    """Straight-line code for the middle mean of rows lo..hi-1 (by rank) of an (n, d) matrix,
    and whether every value of the matrix is finite (a boolean, reduced in the same loop)."""
    steps, outputs = network_schedule(n, lo, hi, False)
    m = hi - lo
    lines = [f"def middle_mean_{n}_{lo}_{hi}(x):"]
    lines += [f"    s{i} = x[{i}]" for i in range(n)]
    # no second pass over x for the NaN/inf check
    lines.append("    check = (" + " & ".join(f"torch.isfinite(s{i})" for i in range(n)) + ").all()")
    for is_min, a, b, out in steps:
        lines.append(f"    s{out} = torch.{'minimum' if is_min else 'maximum'}(s{a}, s{b})")
    mids = [f"s{o}" for o in outputs]
    if m == 1:
        lines.append(f"    out = {mids[0]} * 1")
    elif m == 2:  # as the numpy network: halve, then add (exact, cannot overflow)
        lines.append(f"    out = {mids[0]} * 0.5 + {mids[1]} * 0.5")
    else:  # summed in float64 in the numpy network's order, rounded once
        lines.append(f"    acc = {mids[0]}.to(torch.float64)")
        lines += [f"    acc = acc + {v}.to(torch.float64)" for v in mids[1:]]
        lines.append(f"    out = (acc / {m}).to(x.dtype)")
    lines.append("    return out, check")
    return "\n".join(lines) + "\n"


def _build(n: int, lo: int, hi: int, dtype: torch.dtype) -> Callable:
    scope: dict = {"torch": torch}
    code = compile(_source(n, lo, hi), f"<fleetlearn middle mean n={n} lo={lo} hi={hi}>", "exec")
    exec(code, scope)  # noqa: S102 - our own generated code: one function per kernel
    fn = torch.compile(scope[f"middle_mean_{n}_{lo}_{hi}"], dynamic=True, fullgraph=True)
    probe = torch.zeros(n, 8, dtype=dtype)  # the column count stays symbolic (dynamic=True): any d >= 2 reuses it
    fn(probe)
    return fn


def _submit(key: tuple, wait: bool) -> Future:
    """The kernel's future: a new one is built here (`wait`) or on a daemon thread (a process
    that ends mid-compile does not wait for the compiler); with `wait`, a kernel already
    being built on a thread is waited for."""
    build_here = False
    with _lock:
        fut = _kernels.get(key)
        if fut is None:
            fut = Future()
            fut.set_running_or_notify_cancel()
            _kernels[key] = fut
            if wait:
                build_here = True
            else:
                threading.Thread(target=_build_into, args=(fut, key), name="fleetlearn-kernels", daemon=True).start()
    if build_here:
        _build_into(fut, key)
    elif wait:
        fut.exception()  # blocks until the thread building it is done
    return fut


def _build_into(fut: Future, key: tuple) -> None:
    with _compile_lock:  # one compile at a time (a background one and a waiting caller's)
        try:
            fut.set_result(_build(*key))
        except Exception as exc:  # noqa: BLE001 - reported once by `_ready`; the numpy network answers
            fut.set_exception(exc)


def _ready(fut: Future, key: tuple) -> Callable | None:
    if not fut.done():
        return None
    exc = fut.exception()
    if exc is None:
        return fut.result()
    with _lock:
        first = key not in _failed
        _failed.add(key)
    if first:
        log.warning("aggregation: compiling the middle-mean kernel for %d rows failed (%s: %s); the numpy network "
                    "answers instead", key[0], type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    return None


def middle_mean(x: torch.Tensor, k: int) -> tuple[torch.Tensor, bool] | None:
    """The mean of the values ranked k+1..n-k in every column of `x`, and whether every
    value of `x` is finite; None when the compiled kernel is not to be used (mode, size,
    device, no compiler) or not ready yet: the caller runs the numpy network."""
    n, d = x.shape
    if (_mode == "numpy" or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64)
            or not 2 <= n <= NETWORK_MAX_N_CPU or d < 2 or not x.is_contiguous()
            or (_mode == "auto" and x.numel() < AUTO_MIN_ELEMENTS) or compiler() is None):
        return None
    key = (n, k, n - k, x.dtype)
    fn = _ready(_submit(key, wait=_mode == "compiled"), key)
    if fn is None:
        return None
    out, check = fn(x)
    return out, bool(check)


def wait(timeout: float | None = None) -> bool:
    """Wait for the kernels being compiled in the background; True when none is left."""
    with _lock:
        pending = [f for f in _kernels.values() if not f.done()]
    for f in pending:
        try:
            f.exception(timeout=timeout)
        except TimeoutError:
            return False
    return True

