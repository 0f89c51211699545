"""Asynchronous buffered aggregation: FedBuff (Nguyen et al., AISTATS 2022, Alg. 1).

`concurrency` clients train at once.  Each reply is validated as it arrives and
goes into a buffer, weighted by a staleness function s(tau) of how many server
versions passed since the model it trained on; after `buffer_size` updates the
server steps with  w <- w + lr * sum_i n_i g_i delta_i / sum_i n_i  (the
example-weighted form), and a new client is dispatched for each one that finished.

The scale g_i follows `server.staleness_step` (`StalenessStep`):

- "adaptive" (the default): g_i = s(tau_i) / mean(s) / (1 + mean(tau)), the means over
  every update the run aggregated so far (this buffer included).  Within a buffer a
  staler update still counts less (s decreases); across the run the mean of g is
  1 / (1 + mean staleness), so the step shrinks with the measured delay, not with the
  shape of s.  With `concurrency` clients in flight and a buffer of `buffer_size`, an
  update is about concurrency / buffer_size - 1 versions old, and stale deltas repeat
  the moves already made since their base model: steps of the full server_lr then
  overshoot (constant weights on a 60-in-flight, buffer-10 fleet end near 50%
  accuracy, benchmarks/stragglers.py).  With no staleness (buffer = concurrency on
  equal devices) g = 1: exactly FedAvg.
- "fixed": g_i = s(tau_i), as configured: a step shrinks by the buffer's mean s(tau),
  so the same s gives a different step on every fleet.

The dispatches overlap: each is a task group the transport keeps open
(`Transport.open_group`) until its clients replied, and replies of all open groups
come out of one stream (`next_arrival`).  On a simulation, time is the
Coordinator's virtual clock and replies come in simulated-arrival order; on a
realtime transport (gRPC) they come as they reach the server, stamped with the
wall-clock seconds since their dispatch.  Clients freed at the same instant (the
replies already due) are dispatched together, so a simulation can still train them
as one batched computation.  Before the first dispatch, and whenever nobody is in
flight or free, the loop waits for clients (`Coordinator.wait_for_clients`) like the
synchronous driver; if they do not come, the run stops with the reason.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np

from ..messages import Dropout, Task
from ..records import ClientRecord, RoundRecord
from ..transport.base import Arrival
from ..validation import ValidationContext
from .coordinator import Collected, Coordinator
from .intake import round_deadline
from .running import clients_ready

STALENESS_WEIGHTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "constant": lambda s: np.ones_like(s, dtype=np.float64),
    "sqrt": lambda s: 1.0 / np.sqrt(1.0 + s),
    "inverse": lambda s: 1.0 / (1.0 + s),
}


class StalenessStep:
    """The scale of each buffered update in a FedBuff step (`server.staleness_step`, see
    the module doc).  Keeps the run's totals of aggregated updates, their staleness and
    their weights s(tau); `relearn` rebuilds them from the records on resume."""

    def __init__(self, rule: str, weight_fn: Callable[[np.ndarray], np.ndarray]):
        if rule not in ("adaptive", "fixed"):
            raise ValueError(f"server.staleness_step must be 'adaptive' or 'fixed', got {rule!r}")
        self.rule, self.weight_fn = rule, weight_fn
        self.count, self.weight_sum, self.staleness_sum = 0, 0.0, 0.0

    def relearn(self, records: list[RoundRecord]) -> None:
        s = np.array([x.staleness for r in records if r.status != "failed"
                      for x in r.clients if x.status == "accepted"], dtype=np.float64)
        self.count, self.weight_sum, self.staleness_sum = 0, 0.0, 0.0
        if s.size:
            self.add(s, self.weight_fn(s))

    def add(self, staleness: np.ndarray, weights: np.ndarray) -> None:
        self.count += int(staleness.size)
        self.weight_sum += float(weights.sum())
        self.staleness_sum += float(staleness.sum())

    def __call__(self, staleness: np.ndarray) -> np.ndarray:
        """The scales of one buffer's updates (their staleness in versions); counts them in."""
        s = np.asarray(staleness, dtype=np.float64)
        w = np.asarray(self.weight_fn(s), dtype=np.float64)
        self.add(s, w)
        if self.rule == "fixed":
            return w
        mean_w = self.weight_sum / self.count
        mean_s = self.staleness_sum / self.count
        return w / (mean_w * (1.0 + mean_s))


class FedBuffLoop:
    def __init__(self, coordinator: Coordinator):
        self.c = coordinator
        srv = coordinator.config.server
        self.concurrency = srv.concurrency or srv.cohort
        self.buffer_size = srv.buffer_size or srv.cohort
        self.scale = StalenessStep(srv.staleness_step, STALENESS_WEIGHTS[srv.staleness_weight])
        self.scale.relearn(coordinator.records)  # a resumed run goes on with its totals
        self.max_staleness = srv.max_staleness
        self.in_flight: dict[int, Task] = {}
        self.dispatches = 0
        self.pending = 0  # clients to dispatch at the current instant
        self.buffer = Collected()
        self.staleness: list[int] = []
        self.others: list[ClientRecord] = []  # dropped / rejected since the last server step
        self.window_start = 0.0
        self.replies_in_window = 0
        self.deadline: float | None = None  # the last task's deadline
        self.wall_start = time.perf_counter()

    def dispatch(self, k: int) -> int:
        """Send the current model to up to `k` free clients as one task group; returns how many."""
        c = self.c
        free = c.available(self.dispatches + 1)
        free = [int(i) for i in free if int(i) not in self.in_flight]
        k = min(k, len(free))
        if k <= 0:
            return 0
        self.dispatches += 1
        cohort = c.selector.select(free, k, self.dispatches, c.selection_rng(self.dispatches))
        # Each task has the run's deadline (fixed, or adaptive from recent completion times):
        # a device silent past it frees its slot then, not after the heartbeat timeout.
        deadline = round_deadline(c.config.server, c._completions)
        self.deadline = deadline
        task = Task(
            round=self.dispatches,
            version=c.version,
            payload=c.encoded_params(),
            codec=c.downlink.spec,
            spec=c.task_spec(cohort, deadline),  # the same client instructions as a synchronous round (e.g. local DP)
            deadline_s=deadline,
        )
        for cid in cohort:
            self.in_flight[int(cid)] = task
        c.transport.open_group(task, cohort, c.clock.now)
        return len(cohort)

    def run(self, on_round: Callable[[RoundRecord], Any] | None) -> None:
        c = self.c
        transport = c.transport
        if not clients_ready(c):
            return
        self.pending = self.concurrency
        try:
            while c.round < c.config.server.rounds:
                # Freed clients get new tasks as soon as no other reply is due at this instant.
                if self.pending and not transport.arrival_due(c.clock.now):
                    self.pending -= self.dispatch(self.pending)
                if not transport.awaiting_replies():
                    if self.pending and self.reachable():
                        continue
                    break
                arrival = transport.next_arrival()
                if arrival is None:
                    continue  # a group closed with nothing more to say
                c.clock.now = max(c.clock.now, arrival.at)
                self.handle(arrival)
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
        finally:
            transport.close_groups("the run finished" if c.round >= c.config.server.rounds else "the run stopped")

    def reachable(self) -> bool:
        """Nothing in flight and nobody free to dispatch to: wait for clients (the run's
        `wait_for_clients`, as before a synchronous round), else the run stops with the reason."""
        c = self.c
        if c.wait_for_clients is None:
            c.stopped_reason = (f"no client could be reached for a task after {c.round} server steps "
                                f"({len(self.in_flight)} in flight); the run stopped")
            return False
        return clients_ready(c)

    def handle(self, arrival: Arrival) -> None:
        c = self.c
        msg = arrival.reply.message
        task = self.in_flight.get(msg.client_id)
        if task is not None and task.round != arrival.group:
            # A reply for another task group than the one this client trains for now
            # (a transport refuses these; never count one against the current task).
            rec = ClientRecord(msg.client_id, "rejected", f"replay: client {msg.client_id} was sent task {task.round}, "
                               f"this reply is for task {arrival.group}")
            self.others.append(rec)
            return
        self.in_flight.pop(msg.client_id, None)
        self.pending += 1
        if isinstance(msg, Dropout):
            self.others.append(ClientRecord(msg.client_id, "dropped", msg.reason, downlink_bytes=msg.downlink_bytes))
            return
        rec = c.client_record(msg, arrival.reply.elapsed_s)
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
        c.note_completions(arrivals)  # the adaptive deadline's history, as in synchronous rounds
        rec.deadline_s = self.deadline if self.deadline is not None else math.nan
        if arrivals.size:
            p50, p90, p99 = np.percentile(arrivals, [50, 90, 99])
            rec.completion_p50_s, rec.completion_p90_s, rec.completion_p99_s = float(p50), float(p90), float(p99)
        s = np.asarray(self.staleness, dtype=np.float64)
        rec.extra["staleness_mean"] = float(s.mean()) if s.size else math.nan
        rec.extra["staleness_max"] = int(s.max()) if s.size else 0
        refusals = c.transport.take_refusals()
        if refusals is not None:
            rec.extra["refusals"] = refusals  # refused messages by reason since the last step (network transports)
        if failed_reason is None:
            scale = self.scale(s)
            rec.extra["staleness_scale_mean"] = float(scale.mean())  # the step's factor on server_lr (equal n_i)
            c.aggregate(rec, got, scale=scale)
        else:
            rec.status, rec.reason = "failed", failed_reason + "; model unchanged"
        self.buffer, self.others, self.staleness = Collected(), [], []
        self.replies_in_window = 0
        self.window_start = c.clock.now
        out = c.finish_record(rec, self.wall_start)
        self.wall_start = time.perf_counter()
        return out
