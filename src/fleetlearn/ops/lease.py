"""The leader lease's two loops around `RunStore.acquire_lease` / `renew_lease`:

- `wait_for_lease`: a standby polls until the run's lease is free and takes it (returns its
  fencing token);
- `LeaseKeeper`: the leader's heartbeat thread, renewing the lease every ``ttl / 3`` seconds;
  when a renewal finds the lease lost (taken over, or expired while the process stalled or
  could not reach the database) it sets `lost` and calls `on_lost` once.  Losing it is also
  caught without the heartbeat: every commit of a round checks the fencing token in its own
  transaction (`RunStore._check_fence`), so a deposed leader never commits.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from .store import RunStore, StoreError


def lease_holder_id(address: str = "") -> str:
    """A holder id unique to this process: host, pid, the address it serves and a nonce."""
    import os
    import secrets
    import socket

    return f"{socket.gethostname()}:{os.getpid()}:{address}:{secrets.token_hex(3)}"[:200]


def wait_for_lease(
    store: RunStore, holder: str, ttl: float, poll: float | None = None, stop: threading.Event | None = None, timeout: float | None = None,
    takeover_only: bool = False,
) -> int | None:
    """Block until `holder` holds the run's lease; its fencing token.  None if `stop` was set
    or `timeout` seconds passed first.  A database that cannot be reached is retried (a
    standby outlives an outage).  `takeover_only`: see `RunStore.acquire_lease`."""
    poll = poll if poll is not None else min(0.5, max(0.05, ttl / 10))
    stop = stop or threading.Event()
    end = None if timeout is None else time.monotonic() + timeout
    while not stop.is_set() and (end is None or time.monotonic() < end):
        try:
            token = store.acquire_lease(holder, ttl, takeover_only=takeover_only)
        except StoreError:
            token = None
        if token is not None:
            return token
        stop.wait(poll)
    return None


class LeaseKeeper:
    """Renews `store`'s held lease in a daemon thread until `stop` (which releases it)."""

    def __init__(self, store: RunStore, on_lost: Callable[[], None] | None = None, every: float | None = None):
        if store.lease is None:
            raise StoreError(f"run {store.run_id}: no leader lease held to keep")
        self.store = store
        self.on_lost = on_lost
        self.every = every if every is not None else max(0.02, store._lease_ttl / 3)
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleetlearn-lease", daemon=True)

    def start(self) -> "LeaseKeeper":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                ok = self.store.renew_lease()
            except StoreError:  # the database is unreachable: retry (a commit meanwhile is fenced anyway)
                continue
            if not ok:
                self.lost.set()
                if self.on_lost is not None:
                    self.on_lost()
                return

    def stop(self, release: bool = True) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if release and not self.lost.is_set():
            try:
                self.store.release_lease()
            except StoreError:
                pass  # it expires on its own
