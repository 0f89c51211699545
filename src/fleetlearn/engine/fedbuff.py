"""Asynchronous buffered aggregation: FedBuff (Nguyen et al., AISTATS 2022, Alg. 1).

`concurrency` clients train at once.  Each reply is validated as it arrives and
goes into a buffer, weighted by a staleness function s(tau) of how many server
versions passed since the model it trained on; after `buffer_size` updates the
server steps with  w <- w + lr * sum_i n_i s(tau_i) delta_i / sum_i n_i  (the
example-weighted form; with s = 1 it is exactly FedAvg's aggregate), and a new
client is dispatched for each one that finished.  Time is the Coordinator's
virtual clock: events are processed in simulated-arrival order.

Clients freed at the same instant are dispatched together, so the transport can
still train them as one batched computation.
"""

from __future__ import annotations

import heapq
import math
import time
from itertools import count
from typing import Any, Callable

import numpy as np

from ..messages import Dropout, Task, Update
from ..records import ClientRecord, RoundRecord
from ..validation import ValidationContext
from .coordinator import Collected, Coordinator

STALENESS_WEIGHTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "constant": lambda s: np.ones_like(s, dtype=np.float64),
    "sqrt": lambda s: 1.0 / np.sqrt(1.0 + s),
    "inverse": lambda s: 1.0 / (1.0 + s),
}


class FedBuffLoop:
    def __init__(self, coordinator: Coordinator):
        self.c = coordinator
        srv = coordinator.config.server
        self.concurrency = srv.concurrency or srv.cohort
        self.buffer_size = srv.buffer_size or srv.cohort
        self.weight_fn = STALENESS_WEIGHTS[srv.staleness_weight]
        self.max_staleness = srv.max_staleness
        self.events: list[tuple[float, int, Any]] = []  # (absolute sim time, seq, (reply, task))
        self.seq = count()
        self.in_flight: dict[int, Task] = {}
        self.dispatches = 0
        self.pending = 0  # clients to dispatch at the current instant
        self.buffer = Collected()
        self.staleness: list[int] = []
        self.others: list[ClientRecord] = []  # dropped / rejected since the last server step
        self.window_start = 0.0
        self.replies_in_window = 0
        self.wall_start = time.perf_counter()

    def dispatch(self, k: int) -> None:
        c = self.c
        free = c.available(self.dispatches + 1)
        free = [int(i) for i in free if int(i) not in self.in_flight]
        k = min(k, len(free))
        if k <= 0:
            return
        self.dispatches += 1
        cohort = c.selector.select(free, k, self.dispatches, c.selection_rng(self.dispatches))
        task = Task(
            round=self.dispatches,
            version=c.version,
            payload=c.encoded_params(),
            codec=c.downlink.spec,
            spec=c.task_spec(cohort, None),  # the same client instructions as a synchronous round (e.g. local DP)
            deadline_s=None,
        )
        now = c.clock.now
        for cid in cohort:
            self.in_flight[cid] = task
        for reply in c.transport.dispatch(task, cohort):
            heapq.heappush(self.events, (now + reply.elapsed_s, next(self.seq), reply))

    def run(self, on_round: Callable[[RoundRecord], Any] | None) -> None:
        c = self.c
        self.dispatch(self.concurrency)
        while c.round < c.config.server.rounds:
            if not self.events:
                if self.pending:
                    self.dispatch(self.pending)
                    self.pending = 0
                    continue
                break  # nobody can be reached: stop rather than spin
            t, _, reply = heapq.heappop(self.events)
            c.clock.now = max(c.clock.now, t)
            self.handle(reply)
            self.replies_in_window += 1
            full = len(self.buffer.vecs) >= self.buffer_size
            # A buffer that cannot fill (everyone drops or is refused) must not stall the
            # run: past the deadline, or after 10 x concurrency replies, the step fails.
            deadline = c.config.server.deadline_s
            starved = (deadline is not None and c.clock.now - self.window_start > deadline) or (
                self.replies_in_window >= 10 * self.concurrency
            )
            if full or starved:
                rec = self.step(failed_reason=None if full else f"buffer of {self.buffer_size} did not fill ({len(self.buffer.vecs)} accepted after {self.replies_in_window} replies)")
                if on_round is not None:
                    on_round(rec)
            if self.pending and (not self.events or self.events[0][0] > c.clock.now):
                self.dispatch(self.pending)
                self.pending = 0

    def handle(self, reply) -> None:
        c = self.c
        msg = reply.message
        task = self.in_flight.pop(msg.client_id, None)
        self.pending += 1
        if isinstance(msg, Dropout):
            self.others.append(ClientRecord(msg.client_id, "dropped", msg.reason, downlink_bytes=msg.downlink_bytes))
            return
        rec = c.client_record(msg, reply.elapsed_s)
        if task is None:
            rec.status, rec.reason = "rejected", f"replay: client {msg.client_id} has no task in flight"
            self.others.append(rec)
            return
        staleness = c.version - task.version
        rec.staleness = staleness
        if self.max_staleness is not None and staleness > self.max_staleness:
            rec.status, rec.reason = "rejected", f"stale: {staleness} versions behind, max_staleness is {self.max_staleness}"
            self.others.append(rec)
            return
        # Validate against the task this client was given (round and base version).
        ctx = ValidationContext(round=task.round, version=task.version, dim=c.dim)
        vec = c.accept(msg, rec, ctx)
        if vec is None:
            self.others.append(rec)
            return
        self.buffer.vecs.append(vec)
        self.buffer.payloads.append(msg.payload)
        self.buffer.claims.append(int(msg.num_examples))
        self.buffer.accepted.append(rec)
        self.buffer.clients.append(rec)
        self.staleness.append(staleness)

    def step(self, failed_reason: str | None = None) -> RoundRecord:
        c = self.c
        c.round += 1
        got, others = self.buffer, self.others
        rec = RoundRecord(round=c.round, version=c.version, sim_start_s=self.window_start)
        rec.clients = got.clients + others
        rec.selected = len(rec.clients)
        rec.accepted = len(got.accepted)
        rec.dropped = sum(x.status == "dropped" for x in others)
        rec.rejected = sum(x.status == "rejected" for x in others)
        rec.uplink_bytes = sum(x.uplink_bytes for x in rec.clients)
        rec.downlink_bytes = sum(x.downlink_bytes for x in rec.clients)
        rec.sim_seconds = c.clock.now - self.window_start
        arrivals = np.array([x.arrival_s for x in got.accepted])
        if arrivals.size:
            p50, p90, p99 = np.percentile(arrivals, [50, 90, 99])
            rec.completion_p50_s, rec.completion_p90_s, rec.completion_p99_s = float(p50), float(p90), float(p99)
        s = np.asarray(self.staleness, dtype=np.float64)
        rec.extra["staleness_mean"] = float(s.mean()) if s.size else math.nan
        rec.extra["staleness_max"] = int(s.max()) if s.size else 0
        if failed_reason is None:
            c.aggregate(rec, got, scale=self.weight_fn(s))
        else:
            rec.status, rec.reason = "failed", failed_reason + "; model unchanged"
        self.buffer, self.others, self.staleness = Collected(), [], []
        self.replies_in_window = 0
        self.window_start = c.clock.now
        out = c.finish_record(rec, self.wall_start)
        self.wall_start = time.perf_counter()
        return out
