"""`fleetlearn aggregator`: one region's aggregator between its clients and the root.

Downward it is a server: the same gRPC service the root runs for clients
(`GrpcTransport`: tokens, TLS, registration, task streaming, update intake and its
refusals), taking only the clients of its region (`RegionMembership`: client id mod
`engine.regions`).  Upward it is a client of the root (`RegionUplink`, a `FleetClient`:
its own token, TLS, heartbeats, retries, re-registration), announcing the feature
"region" and its region id.

Each round: the root's task arrives as any client's would; the aggregator dispatches it
unchanged (same round, model version, payload and task spec) to its available clients
(up to `server.cohort`), with the root's deadline less a forwarding margin, and collects
their replies with the Coordinator's own intake (`engine.intake.collect`: the run's
decoder and validators, the relative-norm filter).  The accepted updates are weighted by
the run's weighting part (`step.cohort_weights`) and folded into one float64 weighted sum
and total weight (`hierarchy.regional_mean`), which it forwards to the root
(`regions.pack_region_sum`, `UpdateMeta.region`: its clients and their bytes).

It keeps nothing across rounds: a restarted aggregator re-registers with the root and
its clients (who retry with backoff) re-register with it; the round it died in is
recorded by the root as that region's failure, with the reason.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..messages import Task
from ..transport.grpc import fleetlearn_pb2 as pb
from ..transport.grpc.client import FleetClient
from .hierarchy import regional_mean
from .intake import Intake, UpdateDecoder, collect, stacked
from .regions import REGION_FEATURE, REGION_SUM_CODEC, RegionMembership, pack_region_sum
from .step import cohort_weights

log = logging.getLogger("fleetlearn.aggregator")

FORWARD_MARGIN_S = 2.0  # the most a region keeps of the root's deadline for forwarding its sum
# Test hook: "ROUND" holds that round's forward for two minutes (tests kill -9 the aggregator then);
# "ROUND:PATH" holds it until PATH exists.
FAULT_ENV = "FLEETLEARN_AGGREGATOR_HOLD"


@dataclass
class Forward:
    """What a region forwards for one round."""

    payload: bytes  # S_r (dim float64) then W_r
    weight: float
    clients: int  # accepted updates in S_r
    selected: int
    dropped: int  # selected clients that dropped, were refused or came late
    examples: int  # the accepted clients' claimed examples
    client_uplink_bytes: int
    client_downlink_bytes: int
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def _nanmean(values) -> float:
    a = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    return float(a.mean()) if a.size else math.nan


class RegionAggregator:
    """One region's rounds: dispatch the root's task to the region's clients, collect, and
    pre-aggregate the accepted updates into (S_r, W_r)."""

    def __init__(self, config, learner, transport, region: int, *, min_clients: int = 1, wait_s: float = 60.0):
        from .factory import build_run_validators, build_weighting
        from ..compression import parse_chain
        from ..validation import RelativeNormFilter

        self.config, self.learner, self.transport = config, learner, transport
        self.region, self.min_clients, self.wait_s = int(region), int(min_clients), float(wait_s)
        self.dim = learner.spec.dim
        srv = config.server
        uplink = parse_chain(config.uplink_chain(learner.spec))
        norm_filter = RelativeNormFilter(srv.max_norm_ratio) if srv.max_norm_ratio is not None else None
        # The Coordinator's intake: the run's decoder and validators, applied to this region's clients.
        self.intake = Intake(UpdateDecoder(uplink, self.dim), build_run_validators(config), norm_filter)
        self.weighting = build_weighting(config)
        self.rounds: list[dict[str, Any]] = []  # a line per round (what the CLI prints)
        hold = os.environ.get(FAULT_ENV, "").split(":", 1)
        self._hold_round = int(hold[0]) if hold[0].isdigit() else None
        self._hold_until = hold[1] if len(hold) > 1 else None

    def cohort(self, task: Task, deadline: float) -> list[int]:
        """The region's clients for this round: every available one, or `server.cohort` of
        them drawn from (seed, round, region) when more are connected."""
        if self.min_clients > 0:
            self.transport.wait_available(self.min_clients, max(0.0, min(self.wait_s, deadline - time.monotonic())))
        available = np.asarray(sorted(self.transport.available(task.round)), dtype=np.int64)
        want = self.config.server.cohort
        if len(available) <= want:
            return available.tolist()
        rng = np.random.default_rng([self.config.seed, 0x2E610, task.round, self.region])
        return sorted(rng.choice(available, size=want, replace=False).tolist())

    def region_round(self, task: Task, local_deadline: float) -> Forward | None:
        """One round in this region (blocking; runs on a worker thread of the uplink)."""
        t0 = time.monotonic()
        cohort = self.cohort(task, local_deadline)
        if not cohort:
            self._note(task.round, "no client of this region connected", 0, 0, t0)
            return None
        sub = task
        if math.isfinite(local_deadline):
            left = local_deadline - time.monotonic()
            sub = dataclasses.replace(task, deadline_s=max(left - min(FORWARD_MARGIN_S, 0.1 * max(left, 0.0)), 1e-3))
        got = collect(self.transport, self.intake, sub, cohort, len(cohort), self.dim)
        self.intake.filter_relative_norms(got)
        refusals = self.transport.take_refusals()
        up = sum(c.uplink_bytes for c in got.clients)
        down = sum(c.downlink_bytes for c in got.clients)
        if not got.vecs:
            reasons = sorted({f"{c.status}: {c.reason}" for c in got.clients})
            self._note(task.round, f"no accepted update ({'; '.join(reasons)[:300]})", 0, len(cohort), t0, refusals)
            return None
        order = sorted(range(len(got.accepted)), key=lambda i: got.accepted[i].client_id)  # as the root orders rows
        got.take(order)
        matrix = stacked(got.vecs)
        weights = cohort_weights(self.weighting, got, matrix, None)
        sums, totals = regional_mean(matrix, weights, np.zeros(len(order), dtype=np.int64), 1)
        weight = float(totals[0])
        if not (math.isfinite(weight) and weight > 0):
            self._note(task.round, f"the accepted updates' total weight is {weight}", 0, len(cohort), t0, refusals)
            return None
        acc = got.accepted
        fwd = Forward(
            payload=pack_region_sum(sums[0], weight), weight=weight, clients=len(acc), selected=len(cohort),
            dropped=len(cohort) - len(acc), examples=int(sum(got.claims)), client_uplink_bytes=int(up), client_downlink_bytes=int(down),
            metrics={
                "loss_before": _nanmean(c.loss_before for c in acc), "loss_after": _nanmean(c.loss_after for c in acc),
                "accuracy": _nanmean(c.accuracy for c in acc), "steps": int(sum(c.steps for c in acc)),
            },
            seconds=time.monotonic() - t0,
        )
        self._note(task.round, "", len(acc), len(cohort), t0, refusals, weight)
        if self._hold_round is not None and task.round == self._hold_round:
            log.warning("region %d: holding the forward of round %d (%s)", self.region, task.round, FAULT_ENV)
            print(f"region {self.region}: holding round {task.round}", file=sys.stderr, flush=True)
            end = time.monotonic() + 120.0
            while time.monotonic() < end and not (self._hold_until and os.path.exists(self._hold_until)):
                time.sleep(0.05)
        return fwd

    def _note(self, round: int, problem: str, accepted: int, selected: int, t0: float, refusals=None, weight: float = 0.0) -> None:
        line = {"round": round, "region": self.region, "accepted": accepted, "selected": selected, "weight": weight,
                "seconds": round_(time.monotonic() - t0), "refusals": dict(refusals or {}), "problem": problem}
        self.rounds.append(line)
        if problem:
            log.warning("region %d, round %d: nothing to forward: %s", self.region, round, problem)
        else:
            log.info("region %d, round %d: %d/%d accepted, weight %.6g", self.region, round, accepted, selected, weight)


def round_(x: float) -> float:
    return round(x, 4)


class RegionUplink(FleetClient):
    """The aggregator's link to the root: a client whose work on a task is its region's
    round (`RegionAggregator.region_round`) and whose update is the region's sum."""

    def __init__(self, server: str, token: str, aggregator: RegionAggregator, **kwargs: Any):
        super().__init__(server, token, aggregator.learner, None, **kwargs)  # type: ignore[arg-type]
        self.aggregator = aggregator

    def _register_request(self) -> pb.RegisterRequest:
        request = super()._register_request()
        request.capabilities.features.append(REGION_FEATURE)
        request.region = self.aggregator.region
        return request

    async def _train_and_push(self, stub, pulled) -> None:
        task, local_deadline, _uplink, _width, _secagg = pulled
        assert self._client_id is not None
        try:
            fwd = await asyncio.to_thread(self.aggregator.region_round, task, local_deadline)
        finally:
            self._after_round = task.round
        if fwd is None:
            self.report.skipped_bad_task += 1
            return
        if time.monotonic() > local_deadline:
            self.report.skipped_late += 1
            log.warning("region %d: round %d's deadline passed before its sum was ready; not forwarded", self.aggregator.region, task.round)
            return
        m = fwd.metrics
        meta = pb.UpdateMeta(
            client_id=self._client_id, session=self._session or "", round=task.round, base_version=task.version,
            codec=REGION_SUM_CODEC, num_examples=fwd.examples, payload_bytes=len(fwd.payload),
            downlink_bytes=len(task.payload) + len(task.control),
            metrics=pb.ClientMetrics(loss_before=m["loss_before"], loss_after=m["loss_after"], accuracy=m["accuracy"],
                                     compute_seconds=fwd.seconds, steps=int(m["steps"]), samples=0),
            region=pb.RegionSum(region=self.aggregator.region, weight=fwd.weight, clients=fwd.clients, selected=fwd.selected,
                                client_uplink_bytes=fwd.client_uplink_bytes, client_downlink_bytes=fwd.client_downlink_bytes,
                                dropped=fwd.dropped),
        )
        if await self._push_update(stub, meta, fwd.payload, local_deadline):
            self.report.rounds.append(task.round)


def build_aggregator(config, region: int, *, address: str, state_dir, cert_dir=None, mutual_tls: bool = False,
                     insecure: bool = False, heartbeat_interval_s: float = 5.0, max_round_s: float = 600.0,
                     min_clients: int = 1, wait_s: float = 60.0):
    """(RegionAggregator, its client-facing GrpcTransport) for `fleetlearn aggregator`.
    ConfigError / ValueError for a run a root of regional aggregators cannot serve."""
    from ..config import ConfigError
    from ..data import load_federated
    from ..transport.grpc.commands import server_transport
    from ..transport.grpc.local_data import learner_from_config

    eng = config.engine
    if not eng.region_aggregators:
        raise ConfigError(f"fleetlearn aggregator serves one region of a run with engine.region_aggregators = true; this config "
                          f"has engine.region_aggregators = false (engine.regions = {eng.regions})")
    membership = RegionMembership(region, eng.regions)  # ValueError for a region out of range
    fed = load_federated(config.data, config.seed)
    learner = learner_from_config(config, fed.num_features, fed.num_classes)
    transport = server_transport(config, learner.spec, address=address, state_dir=state_dir, cert_dir=cert_dir,
                                 mutual_tls=mutual_tls, heartbeat_interval_s=heartbeat_interval_s, max_round_s=max_round_s,
                                 insecure=insecure, learner=learner, membership=membership)
    return RegionAggregator(config, learner, transport, region, min_clients=min_clients, wait_s=wait_s), transport


def run_aggregator(aggregator: RegionAggregator, root: str, token: str, *, tls=None, name: str = "",
                   give_up_after_s: float | None = None, max_rounds: int | None = None):
    """Serve the region until the root says the run finished; returns the uplink's report.
    The region's clients are then told the run finished too."""
    uplink = RegionUplink(root, token, aggregator, tls=tls, name=name or f"region-{aggregator.region}",
                          give_up_after_s=give_up_after_s, max_rounds=max_rounds)

    async def main():
        return await uplink.run()

    try:
        report = asyncio.run(main())
    finally:
        aggregator.transport.finish("the root finished the run")
    return report
