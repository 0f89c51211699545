"""The leader lease and its fencing token (issue 18, item 1): two RunStore handles on one
store (real PostgreSQL started on 127.0.0.1 by the `postgres_url` fixture, and SQLite);
A leads, its lease expires or is taken over, B leads; A's late commit is refused and the
committed rounds are unchanged."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from fleetlearn.ops import RunStore, StoreError
from fleetlearn.ops.lease import LeaseKeeper, wait_for_lease
from fleetlearn.records import RoundRecord


@pytest.fixture(params=["sqlite", "postgresql"])
def two_handles(request, tmp_path):
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    a = RunStore.create(tmp_path / "runs", "seed = 1\n", "h", url=url)
    a.close()  # the flock is per process; the lease is what decides between A and B here
    a = RunStore.open(a.run_dir, url=url)
    b = RunStore.open(a.run_dir, url=url)
    yield a, b
    a.close()
    b.close()


def _rounds(store: RunStore) -> list[tuple[int, int]]:
    return [(r.round, r.version) for r in store.records()]


def test_a_deposed_leaders_late_commit_is_refused_and_writes_nothing(two_handles):
    a, b = two_handles
    ta = a.acquire_lease("server-a", ttl=2.0)  # long enough for a loaded CI machine's commit below
    assert ta == 1
    assert b.acquire_lease("server-b", ttl=2.0) is None  # A's lease is live: B waits
    params = torch.arange(4, dtype=torch.float32)
    a.commit_round(RoundRecord(round=1, version=1, parent_version=0), params, privacy={"eps": 0.5})
    assert a.renew_lease()  # the heartbeat: A's lease is surely live for B's attempt
    with pytest.raises(StoreError, match="led by 'server-a'"):  # no lease held: refused while A leads
        b.commit_round(RoundRecord(round=2, version=2, parent_version=1))
    # A stalls past its expiry (a GC pause, a partition from the database): B takes over then
    deadline = time.monotonic() + 10
    while (tb := b.acquire_lease("server-b", ttl=30)) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert tb == ta + 1
    ckpts = sorted(p.name for p in (a.run_dir / "checkpoints").iterdir())
    with pytest.raises(StoreError, match=r"'server-a', fencing token 1\) lost the leader lease \(now held by 'server-b' with token 2\)"):
        a.commit_round(RoundRecord(round=2, version=2, parent_version=1), params + 1, privacy={"eps": 9.0})
    assert _rounds(b) == [(1, 1)]  # nothing of A's late round: no record ...
    assert b.info()["rounds_done"] == 1
    assert b.privacy_state(1) == {"eps": 0.5} and b.privacy_state(2) is None  # ... no ledger ...
    assert sorted(p.name for p in (a.run_dir / "checkpoints").iterdir()) == ckpts  # ... no checkpoint file
    version, loaded, _ = b.load_checkpoint()
    assert version == 1 and torch.equal(loaded, params)
    for late in (lambda: a.finish({}), lambda: a.save_checkpoint(2, 2, params), lambda: a.commit_round(RoundRecord(round=2, version=2))):
        with pytest.raises(StoreError, match="leader lease"):
            late()
    assert a.renew_lease() is False and a.lease is None
    b.commit_round(RoundRecord(round=2, version=2, parent_version=1), params + 2)  # the new leader commits
    assert _rounds(a) == [(1, 1), (2, 2)] and b.info()["status"] == "running"


def test_an_expired_lease_nobody_took_is_renewed_and_a_released_one_is_taken_at_once(two_handles):
    a, b = two_handles
    assert b.acquire_lease("standby", ttl=30, takeover_only=True) is None  # a standby never takes a run's first lease
    assert b.lease_row() is None
    assert a.acquire_lease("server-a", ttl=0.3) == 1
    time.sleep(0.5)
    assert not b.lease_row()["live"]  # expired: a standby could take it now ...
    a.commit_round(RoundRecord(round=1, version=1))  # ... but nobody did: A's late commit is still fenced by its token
    assert a.renew_lease() is True and b.lease_row()["live"] and b.lease_row()["token"] == 1  # and its heartbeat goes on
    assert _rounds(b) == [(1, 1)]
    assert a.acquire_lease("server-a", ttl=30) == 2  # re-acquiring is a new token
    assert b.acquire_lease("server-b", ttl=30) is None
    assert b.lease_row() == {"holder": "server-a", "token": 2, "expires_at": pytest.approx(b.lease_row()["expires_at"]), "live": True}
    a.release_lease()
    assert b.acquire_lease("standby", ttl=30, takeover_only=True) == 3  # one a leader held before: taken over
    with pytest.raises(StoreError, match="holder id"):
        a.acquire_lease("", ttl=1)
    with pytest.raises(StoreError, match="ttl"):
        a.acquire_lease("x", ttl=0)


def test_the_heartbeat_keeps_the_lease_and_a_standby_takes_over_when_it_stops(two_handles):
    a, b = two_handles
    assert a.acquire_lease("server-a", ttl=1.0) == 1
    keeper = LeaseKeeper(a).start()
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(wait_for_lease(b, "server-b", ttl=1.0, poll=0.05)))
    waiter.start()
    time.sleep(1.5)  # more than a ttl: the heartbeat kept A leading
    assert got == [] and a.lease_row()["holder"] == "server-a"
    a.commit_round(RoundRecord(round=1, version=1))
    keeper.stop(release=False)  # A dies without releasing (kill -9): B takes over after the expiry
    waiter.join(timeout=10)
    assert got == [2] and b.lease == ("server-b", 2)
    with pytest.raises(StoreError, match="lost the leader lease"):
        a.commit_round(RoundRecord(round=2, version=2))
    b.commit_round(RoundRecord(round=2, version=2))
    assert _rounds(a) == [(1, 1), (2, 2)]


def test_a_heartbeat_that_finds_the_lease_taken_reports_it_lost(two_handles):
    a, b = two_handles
    assert a.acquire_lease("server-a", ttl=0.3) == 1
    lost = threading.Event()
    keeper = LeaseKeeper(a, on_lost=lost.set, every=1.0)  # renews too rarely: the lease expires between beats
    keeper.start()
    time.sleep(0.5)
    assert b.acquire_lease("server-b", ttl=30) == 2
    assert lost.wait(5) and keeper.lost.is_set()
    keeper.stop()
    assert b.lease_row()["holder"] == "server-b"  # stopping a keeper that lost the lease releases nothing
