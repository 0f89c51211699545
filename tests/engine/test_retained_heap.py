"""A run keeps the memory its rounds free for the next round (glibc's allocator:
`engine.running.RetainedHeap`), and hands it back to the kernel when it ends."""

from __future__ import annotations

import ctypes
import os

import pytest

from fleetlearn.engine.running import MMAP_FROM, RETAINED_MAX, RetainedHeap, _glibc

LIBC = _glibc()
pytestmark = pytest.mark.skipif(LIBC is None or not hasattr(LIBC, "mallinfo2"), reason="needs glibc >= 2.33 (mallinfo2)")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _info() -> _Mallinfo2:
    LIBC.mallinfo2.restype = _Mallinfo2
    return LIBC.mallinfo2()


MB = 1 << 20


def _rss() -> int:
    """This process's resident memory, bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_freed_blocks_stay_with_the_process_during_a_run_and_go_back_after_it():
    with RetainedHeap(256 * MB):
        mapped_before, rss_before = _info().hblkhd, _rss()
        blocks = [bytearray(MB) for _ in range(24)]  # 1 MiB each (zeroed: resident): above glibc's default mmap threshold
        assert _info().hblkhd - mapped_before < 4 * MB  # they came from the heap, not one mmap each
        assert _rss() - rss_before >= 20 * MB
        del blocks
        kept = _rss()
        assert kept - rss_before >= 16 * MB  # freed, and still the process's: kept for the next round
    assert kept - _rss() >= 16 * MB  # the run's end handed them back to the kernel (malloc_trim)


def test_the_retained_amount_follows_the_cohort_and_is_bounded():
    class _Srv:
        cohort, over_selection = 1000, 1.3

    class _Cfg:
        server = _Srv()

    class _Run:
        config, dim = _Cfg(), 9610

    assert RetainedHeap.for_run(_Run()).nbytes == 4 * 1300 * 4 * 9610
    _Run.dim = 10**9
    assert RetainedHeap.for_run(_Run()).nbytes == RETAINED_MAX
    assert RetainedHeap(0).nbytes == 128 << 10  # never below glibc's default
    assert MMAP_FROM == 32 << 20  # glibc refuses larger mmap thresholds on 64-bit
