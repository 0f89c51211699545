"""One `run_client` in its own process, for tests that measure the client's memory.

    python grpc_client_process.py ADDRESS TOKEN

Runs the tiny model's client until the run finishes, then prints one JSON line: the
report's counters, and the process's peak RSS above what it held once set up (MiB).
"""

from __future__ import annotations

import json
import resource
import sys

from grpc_test_support import CLASSES, FEATURES, tiny_data

from fleetlearn.learners import TorchLearner, logistic
from fleetlearn.transport.grpc import Backoff, run_client


def main() -> None:
    address, token = sys.argv[1], sys.argv[2]
    learner = TorchLearner(lambda: logistic(FEATURES, CLASSES), vectorize=False)
    data = tiny_data(0)
    learner.init_params(0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report = run_client(address, token, learner, data, backoff=Backoff(0.05, 0.5), give_up_after_s=20)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024
    print(json.dumps({"rounds": report.rounds, "skipped_bad_task": report.skipped_bad_task, "stopped": report.stopped,
                      "peak_growth_mb": grown}), flush=True)


if __name__ == "__main__":
    main()
