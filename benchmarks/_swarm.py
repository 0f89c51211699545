"""Many simulated devices in one benchmark process: `FleetClient` coroutines, each on its own
gRPC connection, started a moment apart (shared by benchmarks/secagg.py and topology.py)."""

from __future__ import annotations

import asyncio
from typing import Callable


def run_clients(make_client: Callable[[int], object], n: int, stagger_s: float = 0.002) -> list:
    """Build clients ``make_client(0) .. make_client(n - 1)`` inside one event loop (a gRPC aio
    channel needs the loop), run them all until each returns or fails, and return them (their
    ``report`` holds what they saw).  ``stagger_s`` spaces the starts so that hundreds of
    registrations do not arrive in one burst."""

    async def main() -> list:
        clients = [make_client(i) for i in range(n)]
        tasks = []
        for c in clients:
            tasks.append(asyncio.create_task(c.run()))
            await asyncio.sleep(stagger_s)
        await asyncio.gather(*tasks, return_exceptions=True)
        return clients

    return asyncio.run(main())
