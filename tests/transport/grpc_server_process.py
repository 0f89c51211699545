"""A fleetlearn gRPC server in its own process, for the kill -9 test.

    python grpc_server_process.py STATE_DIR PORT FIRST_ROUND VERSION ROUNDS

Runs rounds FIRST_ROUND.. FIRST_ROUND+ROUNDS-1 of a tiny model (version VERSION
first), prints "done <round>" after each, then tells the clients the run finished.
"""

from __future__ import annotations

import sys

import torch

from fleetlearn.compression import parse_chain
from fleetlearn.learners import TorchLearner, logistic
from fleetlearn.messages import Task, Update
from fleetlearn.transport.grpc import GrpcTransport, TokenStore


def main() -> None:
    state, port, first, version, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    learner = TorchLearner(lambda: logistic(4, 3), vectorize=False)
    t = GrpcTransport(f"127.0.0.1:{port}", tokens=TokenStore.open(state), spec=learner.spec, heartbeat_interval_s=0.2)
    print("listening", flush=True)
    params = learner.init_params(version)
    codec = parse_chain("none")
    for r in range(first, first + rounds):
        ids = t.wait_available(1, timeout_s=30)
        task = Task(r, version, codec.encode(params)[0], "none", {"lr": 0.1, "local_epochs": 1, "batch_size": 4, "seed": 1}, deadline_s=10.0)
        ups = [rep.message for rep in t.dispatch(task, ids) if isinstance(rep.message, Update)]
        if ups:
            params = params + torch.stack([codec.decode(u.payload) for u in ups]).mean(0)
            version += 1
        print("done", r, version, ",".join(f"{u.client_id}:{u.base_version}" for u in ups), flush=True)
    t.finish()
    t.close(grace_s=1.0)


if __name__ == "__main__":
    main()
