"""Several real `fleetlearn client`s in one process, for end-to-end tests that need a
fleet without paying a Python + torch start-up per client.  Each is the CLI's client
(`commands.client`: its own gRPC channel, token, TLS and partition slot) on a thread.

    python grpc_fleet_process.py ADDRESS CONFIG CA_PEM INDEX:TOKEN [INDEX:TOKEN ...]

When every client has stopped, prints one JSON line: {index: {"client_id", "rounds",
"stopped", "tasks"}}, where "tasks" lists [round, model version, lr] of every task the
client trained, as its one client device (`Device.run`) received it.
"""

from __future__ import annotations

import json
import sys
import threading
from collections import defaultdict

from fleetlearn.client import Device
from fleetlearn.transport.grpc import commands

received: dict[int, list] = defaultdict(list)
_run = Device.run


def _observed_run(self, task, clients, *args, **kwargs):
    """The device's own `run`, after noting what each client was asked to do."""
    for cid in clients:
        received[int(cid)].append([task.round, task.version, task.spec.fit.lr])
    return _run(self, task, clients, *args, **kwargs)


Device.run = _observed_run


def main() -> None:
    address, config, ca = sys.argv[1], sys.argv[2], sys.argv[3]
    slots = [(int(i), tok) for i, tok in (arg.split(":", 1) for arg in sys.argv[4:])]
    reports: dict[int, dict] = {}

    def run(index: int, token: str) -> None:
        try:
            r = commands.client(address, token, config, client_index=index, tls_ca=ca, name=f"site-{index}", give_up_after_s=120)
            reports[index] = {"client_id": r.client_id, "rounds": r.rounds, "stopped": r.stopped, "tasks": received[r.client_id]}
        except Exception as exc:  # noqa: BLE001 - reported to the test
            reports[index] = {"rounds": 0, "stopped": f"error: {type(exc).__name__}: {exc}"}

    threads = [threading.Thread(target=run, args=slot, daemon=True) for slot in slots]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    print(json.dumps(reports), flush=True)


if __name__ == "__main__":
    main()
