"""`GrpcTransport`: the Transport protocol over a real network.

The Coordinator calls `dispatch(task, cohort)` and iterates replies exactly as
with the simulation; here the clients are processes that registered with a
token, and time is wall-clock time.

Threading: the gRPC server is a grpc.aio server on an asyncio event loop that
runs on its own daemon thread (see `server.py` for why asyncio).  The
Coordinator's thread never touches server state directly: it schedules work on
the loop (`asyncio.run_coroutine_threadsafe`) and drains the round's
`queue.Queue` with timeouts, so `dispatch` stays an ordinary generator, replies
come out in arrival order, and a client that never replies cannot hang it: the
loop closes the round at its deadline (or `max_round_s` when the task has
none) and reports every silent client as a `Dropout`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, Sequence

import grpc

from ...client.probe import PROBE_FEATURE
from ...compression import parse_chain
from ...messages import Dropout, Task
from ...params import ParamSpec
from ..base import Arrival, Reply, TransportBase
from .auth import TokenStore
from .certs import ServerTls
from .server import END, FleetServer, Limits, RoundState, RunRequirements

log = logging.getLogger("fleetlearn.transport.grpc")


def is_loopback(address: str) -> bool:
    """Whether a listen address ("HOST:PORT", "[::1]:PORT", "unix:PATH") is reachable only
    from this machine.  A host name other than "localhost", and 0.0.0.0 / [::], are not."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host = address.rsplit(":", 1)[0] if ":" in address else address
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _GroupOut:
    """A task group's reply queue: what the server puts goes to the shared queue, tagged."""

    def __init__(self, shared: "queue.Queue[Any]", key: int):
        self.shared, self.key = shared, key

    def put(self, item: Any) -> None:
        self.shared.put((self.key, item))


class _Group:
    """An open task group as the Coordinator's side sees it."""

    def __init__(self, cohort: list[int], start: float, hard_stop: float):
        self.cohort, self.start, self.hard_stop = cohort, start, hard_stop
        self.seen: set[int] = set()
        self.rs: RoundState | None = None


class GrpcTransport(TransportBase):
    """Serve a run over gRPC and deliver its rounds to connected clients.

        tokens = TokenStore.open(state_dir)
        transport = GrpcTransport("0.0.0.0:7777", tokens=tokens, spec=learner.spec,
                                  uplink="none", downlink="none", tls=ServerTls.from_dir(certs))
        transport.wait_available(3, timeout_s=60)
        ... Coordinator(transport=transport, ...).run() ...
        transport.finish(); transport.close()

    With `ladder` (adaptive compression) the server names each client's rung in its
    task, from the uplink rate and readiness it measured on that client's earlier
    updates (`clients()` shows them under "link"); see `FleetServer._plan_rungs`.

    Without `tls` the server is plaintext, which it agrees to only on a loopback address
    unless `insecure=True`.

    `available(round)` is the registered clients with a valid token that
    heartbeated within `heartbeat_timeout_s`; client ids are the token store's
    stable ids.  Refusals are counted by reason: `take_refusals()` returns the
    counts since its previous call (one call per round puts each refusal in
    exactly one round record); `refusals_since(round)` and `refusals_total()`
    read without resetting.
    """

    name = "grpc"
    realtime = True  # replies arrive in wall-clock time: stop iterating once the cohort is filled

    def __init__(
        self,
        address: str = "127.0.0.1:0",
        *,
        tokens: TokenStore,
        spec: ParamSpec | None = None,
        uplink: str = "none",
        downlink: str = "none",
        ladder: Sequence[str] | None = None,
        features: Sequence[str] = (),
        clusters: int = 1,
        probe_refusal: str | None = None,
        secagg: bool = False,
        requirements: RunRequirements | None = None,
        tls: ServerTls | None = None,
        limits: Limits = Limits(),
        heartbeat_interval_s: float = 5.0,
        heartbeat_timeout_s: float | None = None,
        max_round_s: float = 600.0,
        grace_s: float = 10.0,
        maximum_concurrent_rpcs: int | None = None,
        server_options: Sequence[tuple[str, Any]] = (),
        insecure: bool = False,
        submodels: Any = None,
        regions: int = 0,
        membership: Any = None,
    ):
        if tls is None and not insecure and not is_loopback(address):
            # Tokens, models and updates would cross the network in clear.
            raise ValueError(f"refusing to serve plaintext gRPC on {address}, which is not a loopback address: tokens and "
                             "models would cross the network unencrypted. Give TLS certificates (fleetlearn server --certs DIR, "
                             "from `fleetlearn certs --host HOST`), or ask for plaintext explicitly (--insecure; insecure=True)")
        self.tokens = tokens
        # `ladder`: adaptive compression (each client's rung per round, from its measured link).
        # `features`: protocol features clients must announce ("scaffold").
        # `clusters`: clustered FL (`spec` is the k stacked models; updates are one block).
        # `probe_refusal`: why this run cannot check probe clients (they are refused), or None.
        # `submodels`: HeteroFL (a `HeteroFLLearner`): each client's width from the memory it
        # declares, its tasks carry only that width's sub-model; clients must announce "heterofl".
        # `secagg`: secure aggregation run by the clients (SecAggStep); they must announce "secagg".
        # `regions`: a root whose clients are the regional aggregators of this many regions
        # (engine.region_aggregators); `membership`: a regional aggregator's server, which takes
        # only its region's clients (`engine.regions.RegionMembership`).
        hetero = {} if submodels is None else {"model_width": 0.0, "min_memory_mb": 0}
        if submodels is not None and "heterofl" not in features:
            features = (*features, "heterofl")
        if secagg and "secagg" not in features:
            features = (*features, "secagg")
        self.requirements = requirements or RunRequirements.for_run(spec, uplink, downlink, ladder=ladder, clusters=clusters,
                                                                    features=tuple(features), probe_refusal=probe_refusal,
                                                                    secagg=secagg, regions=int(regions), **hetero)
        self.submodels = submodels
        self.limits = limits
        self.max_round_s = max_round_s
        self.grace_s = grace_s
        self._stage_s = max_round_s  # secure aggregation: each stage's deadline (the last dispatched round's)
        self.server = FleetServer(tokens, self.requirements, limits, heartbeat_interval_s, heartbeat_timeout_s, submodels=submodels,
                                  membership=membership)
        self._tls = tls
        self._max_rpcs = maximum_concurrent_rpcs
        self._extra_options = list(server_options)
        self._grpc_server: grpc.aio.Server | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="fleetlearn-grpc-server", daemon=True)
        self._thread.start()
        self.port = self._call(self._start(address))
        host = address.rsplit(":", 1)[0]
        self.address = f"{host}:{self.port}"
        self._closed = False
        self._groups: dict[int, _Group] = {}  # open task groups (FedBuff), by round
        self._group_replies: queue.Queue = queue.Queue()  # (group, Reply | END) of every open group
        self._ready: deque[Arrival] = deque()  # replies taken from that queue, not yet handed out
        log.info("fleetlearn gRPC server listening on %s (%s)", self.address, "TLS" if tls else "plaintext")

    # -- the loop thread -------------------------------------------------------------
    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _call(self, coro: Awaitable[Any], timeout: float = 30.0) -> Any:
        """Run `coro` on the server loop and wait for its result."""
        fut: Future = asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]
        return fut.result(timeout)

    def _on_loop(self, fn: Callable[..., Any], *args: Any, timeout: float = 30.0) -> Any:
        async def run() -> Any:
            return fn(*args)

        return self._call(run(), timeout)

    async def _start(self, address: str) -> int:
        receive = self.limits.max_message_bytes
        if self.requirements.secagg and self.requirements.dim:
            receive = max(receive, 8 * (self.requirements.dim + 1) + (64 << 10))  # one masked row (SecAggMaskedInput)
        options = [
            ("grpc.max_receive_message_length", receive),
            ("grpc.max_send_message_length", self.limits.max_message_bytes),
            # Two servers must never share a port silently (one would get half the clients).
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.server.max_pending_requests", self.limits.max_pending_requests),
            ("grpc.server.max_pending_requests_hard_limit", 2 * self.limits.max_pending_requests),
            *self._extra_options,
        ]
        server = grpc.aio.server(options=options, maximum_concurrent_rpcs=self._max_rpcs)
        server.add_generic_rpc_handlers((self.server.handler(),))
        if self._tls is not None:
            port = server.add_secure_port(address, self._tls.credentials())
        else:
            port = server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"cannot listen on {address}")
        await server.start()
        self.server.start()
        self._grpc_server = server
        return port

    # -- Transport protocol ------------------------------------------------------------
    @property
    def population(self) -> int:
        """Clients that hold a valid token (whether connected or not)."""
        return len(self.tokens.active_ids())

    def available(self, round: int) -> Sequence[int]:
        return self._on_loop(self.server.available)

    def client_ids(self) -> Sequence[int]:
        """The population's ids: clients that hold a valid token (the token store's ids)."""
        return sorted(self.tokens.active_ids())

    def dispatch(self, task: Task, cohort: Sequence[int]) -> Iterator[Reply]:
        """Publish `task` to `cohort`; yield each `Update` as it arrives and a `Dropout`
        for each client that disconnects, stops heartbeating or misses the deadline."""
        cohort = sorted({int(c) for c in cohort})
        deadline = task.deadline_s if task.deadline_s is not None else self.max_round_s
        self._stage_s = deadline
        t0 = time.monotonic()
        rs = self._on_loop(self.server.open_round, task, cohort, deadline, self._sub_payloads(task))
        seen: set[int] = set()
        hard_stop = t0 + deadline + self.grace_s
        try:
            while True:
                left = hard_stop - time.monotonic()
                if left <= 0:
                    break
                try:
                    item = rs.out.get(timeout=min(left, 1.0))
                except queue.Empty:
                    continue
                if item is END:
                    return
                seen.add(item.message.client_id)
                yield item
            # The loop did not close the round in time (it should never happen): report the rest.
            log.error("round %d: the server loop did not close the round within %.1fs", task.round, deadline + self.grace_s)
            for cid in cohort:
                if cid not in seen:
                    yield Reply(Dropout(cid, task.round, "the transport did not hear back before its hard stop"), time.monotonic() - t0)
        finally:
            # Also when the Coordinator stops iterating early (e.g. a quorum): later pushes are refused.
            if not self._closed:
                self._loop.call_soon_threadsafe(self.server.end_round, rs, "stopped", "the coordinator stopped collecting")

    def _sub_payloads(self, task: Task) -> dict[float, bytes] | None:
        """HeteroFL: each width's sub-model payload, cut from the task's broadcast on this
        (the Coordinator's) thread, so the server loop only streams bytes."""
        if self.submodels is None:
            return None
        chain = parse_chain(task.codec)
        return {w: self.submodels.sub_payload(task.payload, w, chain) for w in self.submodels.model_widths}
    # -- secure aggregation ---------------------------------------------------------------
    def secure_aggregation(self) -> "GrpcTransport | None":
        """With `secagg` the clients mask their own rows: this transport runs the stages."""
        return self if self.requirements.secagg else None

    def secure_sum(self, round: int, clients: Sequence[int], weights: Sequence[float], recipe: Any, secure: Any,
                   dim: int | None = None) -> Any:
        """Run round `round`'s secure aggregation with `clients` (each told its public weight
        and `recipe`); each of its five stages gets the round's deadline.  `dim`: the entries
        of the vector each client holds (None: the model's).  Returns
        `privacy.secagg.RemoteSum`; raises SecAggError when the round cannot complete."""
        if self.requirements.dim is None:
            raise ValueError("secure aggregation over gRPC needs the model's ParamSpec (spec=...)")
        dim = recipe.width(self.requirements.dim if dim is None else int(dim))
        stage_s = self._stage_s
        return self._call(self.server.run_secagg(round, list(clients), list(weights), recipe, secure, dim, stage_s),
                          timeout=6 * stage_s + 60)

    # -- overlapping task groups (FedBuff; Transport.open_group) ------------------------
    def open_group(self, task: Task, cohort: Sequence[int], start: float) -> None:
        """Publish `task` to `cohort` as a task group open beside the others (the server's
        `open_group`): its replies join one queue with every open group's, tagged by group."""
        cohort = sorted({int(c) for c in cohort})
        deadline = task.deadline_s if task.deadline_s is not None else self.max_round_s
        out = _GroupOut(self._group_replies, task.round)
        group = _Group(cohort, start, time.monotonic() + deadline + self.grace_s)
        self._groups[task.round] = group
        try:
            group.rs = self._on_loop(self.server.open_group, task, cohort, deadline, self._sub_payloads(task), out)
        except BaseException:
            self._groups.pop(task.round, None)
            raise

    def next_arrival(self, timeout_s: float | None = None) -> Arrival | None:
        """The next reply of any open group, as it reaches the server (waits for it)."""
        end = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            self._take_ready()
            if self._ready:
                return self._ready.popleft()
            if not self._groups:
                return None
            wait = 1.0 if end is None else min(1.0, end - time.monotonic())
            if wait <= 0:
                return None
            try:
                self._take(*self._group_replies.get(timeout=wait))
            except queue.Empty:
                self._stop_overdue_groups()

    def arrival_due(self, now: float) -> bool:
        """A reply is already waiting (clients freed together are dispatched together)."""
        self._take_ready()
        return bool(self._ready)

    def awaiting_replies(self) -> bool:
        self._take_ready()
        return bool(self._groups) or bool(self._ready)

    def close_groups(self, reason: str) -> None:
        """Close every open group on the server (later updates are refused: round_closed)."""
        groups, self._groups = self._groups, {}
        self._group_replies, self._ready = queue.Queue(), deque()
        if not self._closed:
            for group in groups.values():
                if group.rs is not None:
                    self._loop.call_soon_threadsafe(self.server.end_round, group.rs, "stopped", reason)

    def _take_ready(self) -> None:
        """Move what the server queued so far into `_ready` (replies) or close groups (END)."""
        while True:
            try:
                self._take(*self._group_replies.get_nowait())
            except queue.Empty:
                return

    def _take(self, key: int, item: Any) -> None:
        group = self._groups.get(key)
        if group is None:
            return  # a group given up at its hard stop: the server's late word on it
        if item is END:
            del self._groups[key]
            return
        group.seen.add(item.message.client_id)
        self._ready.append(Arrival(key, item, group.start + item.elapsed_s))

    def _stop_overdue_groups(self) -> None:
        """Groups the server loop did not close by their deadline + grace (it should never
        happen): every client not heard from is reported dropped, as `dispatch` does."""
        now = time.monotonic()
        for key, group in list(self._groups.items()):
            if now < group.hard_stop:
                continue
            log.error("task group %d: the server loop did not close it by its hard stop", key)
            for cid in group.cohort:
                if cid not in group.seen:
                    self._group_replies.put((key, Reply(Dropout(cid, key, "the transport did not hear back before its hard stop"), 0.0)))
            self._group_replies.put((key, END))
            group.hard_stop = float("inf")
            if group.rs is not None and not self._closed:
                self._loop.call_soon_threadsafe(self.server.end_round, group.rs, "stopped", "hard stop")

    # -- run control ----------------------------------------------------------------------
    def wait_available(self, min_clients: int, timeout_s: float, poll_s: float = 0.1) -> list[int]:
        """Block until at least `min_clients` are available or `timeout_s` passes; returns them."""
        end = time.monotonic() + timeout_s
        while True:
            ids = list(self.available(0))
            if len(ids) >= min_clients or time.monotonic() >= end:
                return ids
            time.sleep(poll_s)

    def clients(self) -> list[dict[str, Any]]:
        """Registered clients: id, name, device profile, capabilities, seconds since last seen."""
        return self._on_loop(self.server.snapshot)

    def probe_clients(self) -> list[int]:
        """Registered clients that announced the "probe" feature (`fleetlearn client --probe`):
        their updates are checked, never aggregated (monitoring/probe_clients.py)."""
        return [int(c["client_id"]) for c in self.clients() if PROBE_FEATURE in c["capabilities"].get("features", ())]

    def aggregator_regions(self) -> dict[int, int]:
        """A root of regional aggregators: registered aggregator client id -> its region."""
        return self._on_loop(self.server.aggregator_regions)

    def region_reports(self, round: int) -> dict[int, dict[str, Any]]:
        """A root of regional aggregators: round `round`'s accepted forwards' `UpdateMeta.region`
        (clients, weight, first-hop bytes) by aggregator client id."""
        return self._on_loop(lambda: dict(self.server.region_reports.get(round, {})))

    def finish(self, reason: str = "the run finished") -> None:
        """Tell every client the run is over (they stop); the server keeps answering until `close`."""
        self._on_loop(self.server.finish, reason)

    def take_refusals(self) -> dict[str, int]:
        """Refusals by reason since the previous call (for the current round's record)."""
        return self.server.refusals.take()

    def refusals_since(self, round: int) -> dict[str, int]:
        return self.server.refusals.since(round)

    def refusals_total(self) -> dict[str, int]:
        return self.server.refusals.total()

    def close(self, grace_s: float = 1.0, linger_s: float | None = None) -> None:
        """Stop serving (in-flight calls get `grace_s`), then stop the loop thread.

        After `finish`, first wait (at most `linger_s`, default two heartbeat
        timeouts) until every connected client has heard that the run finished,
        so clients stop instead of retrying against a server that is gone.
        """
        if self._closed:
            return
        if self.server.finished:
            end = time.monotonic() + (linger_s if linger_s is not None else 2 * self.server.heartbeat_timeout_s)
            while time.monotonic() < end and self._on_loop(self.server.not_yet_told):
                time.sleep(0.05)
        self._closed = True

        async def stop() -> None:
            self.server.stop()
            if self._grpc_server is not None:
                await self._grpc_server.stop(grace_s)

        try:
            self._call(stop(), timeout=grace_s + 10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            if not self._thread.is_alive():
                self._loop.close()

    def __enter__(self) -> "GrpcTransport":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @classmethod
    def from_state_dir(cls, state_dir: str | Path, address: str, **kwargs: Any) -> "GrpcTransport":
        """A transport whose token store is `<state_dir>/tokens.db` (shared with `fleetlearn token`)."""
        return cls(address, tokens=TokenStore.open(state_dir), **kwargs)
