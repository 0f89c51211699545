"""A run leaves what the process held before it, and what survived its first round, out of
Python's cyclic garbage collection (`engine.running.FrozenHeap`), and gives all of it back
when it ends: nested runs share one freeze, and a process's own freeze is left alone."""

from __future__ import annotations

import gc
import weakref

import pytest

from fleetlearn.config import load_config
from fleetlearn.engine import build_coordinator
from fleetlearn.engine.running import FrozenHeap

SMALL = {"data": {"clients": 12}, "server": {"rounds": 3, "cohort": 4}, "client": {"local_epochs": 1}}


@pytest.fixture(autouse=True)
def _no_freeze_before():
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_a_run_freezes_the_heap_and_gives_it_back_after_its_last_round():
    seen = []
    coord = build_coordinator(load_config(SMALL), store=False)
    coord.run(on_round=lambda rec: seen.append(gc.get_freeze_count()))
    assert len(seen) == 3 and min(seen) > 0
    assert gc.get_freeze_count() == 0


def _collectable(obj) -> bool:
    """Whether the cyclic collector sees `obj` (frozen objects are in no generation)."""
    return any(o is obj for o in gc.get_objects())


def test_what_survives_the_first_round_is_frozen_and_later_rounds_freeze_nothing():
    with FrozenHeap() as heap:
        first = [[]]  # a container: tracked by the collector
        assert _collectable(first)
        heap.round_done()
        assert not _collectable(first)
        second = [[]]
        heap.round_done()
        assert _collectable(second)
    assert _collectable(first) and gc.get_freeze_count() == 0


class _Cycle:
    def __init__(self):
        self.me = self


def test_a_cycle_frozen_with_the_heap_is_collected_once_the_run_ends():
    cycle = _Cycle()
    ref = weakref.ref(cycle)
    with FrozenHeap():
        del cycle
        gc.collect()
        assert ref() is not None  # frozen: the collector does not see it during the run
    gc.collect()
    assert ref() is None


def test_nested_runs_share_one_freeze_undone_by_the_last():
    with FrozenHeap() as outer:
        n = gc.get_freeze_count()
        assert n > 0
        with FrozenHeap() as inner:
            inner.round_done()  # the inner run's first round: more frozen, same freeze
            assert gc.get_freeze_count() >= n
        assert gc.get_freeze_count() > 0  # the outer run is still going
        outer.round_done()
    assert gc.get_freeze_count() == 0


def test_a_process_that_froze_its_own_heap_keeps_its_freeze():
    # The count is compared with <=, not ==: another thread of this worker (a gRPC or Ray
    # test's) may free a frozen object meanwhile, which lowers it.
    gc.freeze()
    mine = gc.get_freeze_count()
    assert mine > 0
    with FrozenHeap() as heap:
        late = _Cycle()  # created during the run: a run that does not own the freeze never freezes it
        heap.round_done()
        assert _collectable(late) and 0.9 * mine < gc.get_freeze_count() <= mine
    assert _collectable(late) and 0.9 * mine < gc.get_freeze_count() <= mine  # not unfrozen either
    del late
