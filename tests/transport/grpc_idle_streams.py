"""Opens many calls that never send a message, from its own process (so the server's
memory can be measured alone).

    python grpc_idle_streams.py ADDRESS N WAIT_S [TOKEN]

Spreads N calls over Register, Heartbeat, PullTask and PushUpdate and 8 connections,
without a token (or with TOKEN, or a wrong one, in turn when TOKEN is given); none sends
a message or ends its side.  Waits until the server has ended every call or WAIT_S
passed, prints one JSON line {"open": calls still open, "codes": {status: count}}, and
holds the calls until its stdin closes.
"""

from __future__ import annotations

import asyncio
import json
import sys

import grpc

METHODS = ("PushUpdate", "Register", "Heartbeat", "PullTask")


async def main(address: str, n: int, wait_s: float, token: str | None) -> None:
    channels = [grpc.aio.insecure_channel(address) for _ in range(8)]
    hold = asyncio.Event()

    async def silent():
        await hold.wait()
        return
        yield  # an async generator that never yields

    calls = []
    for i in range(n):
        ch = channels[i % len(channels)]
        method = METHODS[i % len(METHODS)]
        kind = ch.stream_stream if method == "PullTask" else ch.stream_unary
        md = () if token is None or i % 2 else (("authorization", f"Bearer {token if i % 4 == 0 else 'wrong'}"),)
        calls.append(kind(f"/fleetlearn.v1.FleetLearn/{method}")(silent(), metadata=md))
    loop = asyncio.get_running_loop()
    end = loop.time() + wait_s
    while loop.time() < end and not all(c.done() for c in calls):
        await asyncio.sleep(0.05)
    codes: dict[str, int] = {}
    for c in calls:
        if c.done():
            code = (await c.code()).name
            codes[code] = codes.get(code, 0) + 1
    print(json.dumps({"open": sum(not c.done() for c in calls), "codes": codes}), flush=True)
    await loop.run_in_executor(None, sys.stdin.read)
    hold.set()
    for c in calls:
        c.cancel()
    for ch in channels:
        await ch.close(grace=None)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else None))
