"""The `FleetLearn` gRPC service: registration, heartbeats, task streaming, update intake.

`FleetServer` is the server half of the protocol in `fleetlearn.proto`.  It runs
on one asyncio event loop (grpc.aio) and all its state (registrations, the open
round, refusal counts) is touched only from that loop, so it needs no locks;
`GrpcTransport` runs that loop on its own thread and talks to it with
`asyncio.run_coroutine_threadsafe`, and replies leave through a thread-safe
`queue.Queue` per round.

Why asyncio: a round holds one long-polling `PullTask` and one `PushUpdate`
stream per selected client, plus heartbeats.  With the thread-pool server each
open stream pins a thread; with grpc.aio an idle stream is a parked coroutine,
so 1000 connected clients cost memory per connection, not threads.

Nothing a client sends can crash the server: requests are parsed by a
deserializer that turns a parse error into a `malformed` refusal, every
handler turns a `Refusal` into its status code, and any other exception into
INTERNAL (counted as `internal` and logged).

Nothing a client holds open can exhaust it either: every call is authenticated from
its metadata before any message is read (a call without a valid token ends at once),
takes one of a bounded number of slots, in total and per client, and must send its
messages in time (`Limits.first_message_s`, `Limits.upload_idle_s`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import importlib.metadata
import json
import logging
import math
import queue
import re
import secrets
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import grpc
from google.protobuf.message import DecodeError, Message

import numpy as np

from ...client.probe import PROBE_FEATURE
from ...compression import AdaptiveCompression, needed_capabilities, parse_chain, wire
from ...compression.blocks import HEADER_BYTES as BLOCK_HEADER_BYTES
from .regions import REGION_FEATURE, REGION_SUM_CODEC, region_report, region_sum_bytes
from ...messages import ClientMetrics, Dropout, Task, Update
from ...params import ParamSpec
from ...privacy.secagg import SecAggError
from ...task_spec import AdaptiveEntry, LabelHistogramEntry
from ..base import Reply, missed_deadline
from . import fleetlearn_pb2 as pb
from .auth import TokenCheck, TokenStore
from .chunks import DEFAULT_CHUNK_BYTES, PayloadAssembler, iter_chunks
from .refusals import Refusal
from .secagg import (
    STAGES as SECAGG_STAGES,
    SecAggRound,
    Stage as SecAggStage,
    advertise_from_pb,
    directory_to_pb,
    dump as secagg_dump,
    forwarded_to_pb,
    masked_from_pb,
    recipe_to_pb,
    share_keys_from_pb,
    signature_from_pb,
    survivors_to_pb,
    unmask_from_pb,
)

log = logging.getLogger("fleetlearn.transport.grpc")

SERVICE = "fleetlearn.v1.FleetLearn"
TOKEN_HEADER = "authorization"  # value: "Bearer <token>"
RETRY_AFTER_HEADER = "retry-after-ms"
END = object()  # the last item of a round's reply queue


def runtime_version() -> str:
    """This installation's fleetlearn version (what a client announces at registration)."""
    try:
        return importlib.metadata.version("fleetlearn")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        from ... import __version__

        return __version__


def _normalise_chain(spec: str) -> str | None:
    """A chain spec in canonical form ("topk:0.01|q8" -> "topk:0.01 | q8"), None if invalid."""
    try:
        return parse_chain(spec).spec
    except ValueError:
        return None


def _chain_bytes(spec: str, dim: int) -> tuple[int | None, int]:
    """(exact size or None, upper bound) of an update of `dim` values in chain `spec`."""
    chain = parse_chain(spec)
    size = chain.estimate_bytes(dim)
    return (size if chain.exact_size else None), size


def _major(version: str) -> int | None:
    m = re.match(r"^\s*(\d+)\.\d+", version)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class Limits:
    """Server-side bounds on what a client may send or hold open."""

    chunk_bytes: int = DEFAULT_CHUNK_BYTES  # payload chunk size sent, and the largest accepted
    max_update_bytes: int = 256 << 20  # total bytes of one update payload
    max_wait_s: float = 30.0  # the longest a PullTask long poll is held
    max_text_chars: int = 200  # client name, runtime version, codec names
    max_list_items: int = 64  # capabilities lists
    # Calls accepted by gRPC but not yet picked up by a handler.  gRPC's default (1000,
    # with random early drop above it) cancels calls when a 1000-client fleet wakes up
    # at once (every long poll answers, then every client pushes): measured in
    # benchmarks/grpc_load.py.  A burst costs a few KiB per queued call.
    max_pending_requests: int = 1 << 16
    # Calls in progress at once.  A call is authenticated from its metadata before any of
    # its messages is read, so only token holders take a slot; an honest client holds at
    # most a long poll or an upload, a heartbeat and a registration (a retry may overlap
    # the call it replaces).  Beyond a client's share: RESOURCE_EXHAUSTED
    # ("too_many_calls"); beyond the total: UNAVAILABLE ("busy"), which clients retry.
    max_calls: int = 8192
    max_calls_per_client: int = 8
    # A call must send its (first) message within `first_message_s` of opening ("timeout"),
    # and an upload its next chunk within `upload_idle_s` of the previous one ("stalled":
    # the upload is refused and the client dropped from the round with that reason).  The
    # idle bound is per message: a link slower than chunk_bytes / upload_idle_s (1 MiB per
    # 60 s, about 140 kbit/s) needs smaller chunks or a longer bound.
    first_message_s: float = 15.0
    upload_idle_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("chunk_bytes", "max_update_bytes", "max_text_chars", "max_list_items", "max_pending_requests",
                     "max_calls", "max_calls_per_client"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"Limits.{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("max_wait_s", "first_message_s", "upload_idle_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"Limits.{name} must be a finite number of seconds > 0, got {v!r}")

    @property
    def max_message_bytes(self) -> int:
        """gRPC's own per-message cap.  It is looser than `chunk_bytes` on purpose: a
        chunk a little too large reaches the handler and is refused (and counted) as
        `oversized`; only absurd messages are cut off by gRPC itself (RESOURCE_EXHAUSTED,
        not counted)."""
        return 4 * self.chunk_bytes + (64 << 10)


@dataclass(frozen=True)
class RunRequirements:
    """What a client must support to join this run; checked once, at registration.

    `update_bytes` is the exact size of an update when the uplink chain has a
    fixed size for the model (no sparsifier), `update_bytes_max` an upper bound
    otherwise: a payload outside them cannot be the model's (`wrong_shape`).

    Adaptive compression (`ladder`, its rungs from least to most lossy): the server
    picks each client's rung per round and names it in the task (TaskMeta.uplink_codec);
    an update must come in that rung.  `uplink` is then the first rung, and
    `rung_bytes` holds each rung's (exact size or None, upper bound).
    """

    uplink: str = "none"
    downlink: str = "none"
    model_digest: str | None = None
    update_bytes: int | None = None
    update_bytes_max: int | None = None
    runtime: str = field(default_factory=runtime_version)
    # The width every client trains; 0: assigned to each client at registration (HeteroFL,
    # `FleetServer.submodels`), checked there against the widths it announces.
    model_width: float = 1.0
    min_memory_mb: int = 0
    ladder: tuple[str, ...] = ()
    rung_bytes: tuple[tuple[int | None, int], ...] = ()
    # Protocol features a client must announce (Capabilities.features): "scaffold" when
    # tasks carry SCAFFOLD's control variate after the model payload.
    features: tuple[str, ...] = ()
    # The dimension of the vector one update encodes (one model of a clustered run's stack),
    # and the bytes of the block header before its codec payload (clustered runs).
    dim: int | None = None
    block_header_bytes: int = 0
    # Probe clients (Capabilities.features "probe"): why this run cannot check them (they are
    # refused at registration), or None when it can (monitoring/probe_clients.py).
    probe_refusal: str | None = None
    # Secure aggregation (privacy.secure_aggregation): updates stay on the devices, PushUpdate
    # carries no payload and the clients mask their rows in SecAggStep ("secagg" feature).
    secagg: bool = False
    # Regional aggregators (engine.region_aggregators): > 0 on a root whose "clients" are the
    # `fleetlearn aggregator`s of this many regions (feature "region"); an update is then a
    # region's weighted sum and weight (engine/regions.py), not a codec payload.
    regions: int = 0

    @classmethod
    def for_run(
        cls, spec: ParamSpec | None, uplink: str = "none", downlink: str = "none", ladder: Sequence[str] | None = None,
        clusters: int = 1, **kw: Any,
    ) -> "RunRequirements":
        """Requirements of a run training `spec` with these codec chains (validated and
        normalised: a bad chain is a ValueError here, not a refusal of every client).
        With a `ladder` (adaptive compression) `uplink` is ignored: the rungs are the chains.
        `clusters` > 1 (clustered FL): `spec` is the k stacked models and an update is one
        tagged block of them (fleetlearn.compression.blocks)."""
        rungs = [parse_chain(c) for c in ladder] if ladder else []
        up, down = (rungs[0] if rungs else parse_chain(uplink)), parse_chain(downlink)
        if spec is not None:
            if clusters > 1 and spec.dim % clusters:
                raise ValueError(f"a model of {spec.dim} parameters does not split into {clusters} stacked models")
            dim, extra = (spec.dim // clusters, BLOCK_HEADER_BYTES) if clusters > 1 else (spec.dim, 0)

            def size(chain) -> int:  # exact for fixed-size chains, an upper bound otherwise
                return chain.estimate_bytes(dim) + extra

            if kw.get("regions"):  # a region's sum: dim float64 values and its weight
                kw.setdefault("update_bytes", region_sum_bytes(dim))
                kw.setdefault("update_bytes_max", region_sum_bytes(dim))
            kw.setdefault("update_bytes", size(up) if up.exact_size and not rungs else None)
            kw.setdefault("update_bytes_max", max([size(up), *(size(r) for r in rungs)]))
            kw.setdefault("rung_bytes", tuple((size(r) if r.exact_size else None, size(r)) for r in rungs))
            # global params, local params, delta and an optimizer buffer
            kw.setdefault("min_memory_mb", math.ceil(4 * spec.nbytes / (1 << 20)))
            kw.setdefault("dim", dim)
            kw.setdefault("block_header_bytes", extra)
        return cls(uplink=up.spec, downlink=down.spec, model_digest=spec.digest() if spec else None,
                   ladder=tuple(r.spec for r in rungs), **kw)

    def chains(self) -> list[str]:
        """Every uplink chain a client may be asked to send with (the ladder, or the one chain)."""
        return list(self.ladder) or [self.uplink]

    def refusal(self, request: pb.RegisterRequest) -> str | None:
        """Why a client cannot take part in this run, or None if it can."""
        theirs, ours = _major(request.runtime_version), _major(self.runtime)
        if theirs is None:
            return f"runtime version {request.runtime_version!r} is not MAJOR.MINOR[.PATCH]"
        if theirs != ours:
            return f"client runtime {request.runtime_version} is incompatible with server runtime {self.runtime} (major versions differ)"
        cap = request.capabilities
        needed = set(needed_capabilities(self.downlink)).union(*(needed_capabilities(c) for c in self.chains()))  # chains validated by for_run
        missing = sorted(needed - set(cap.codecs))
        if missing:
            up = f"adaptive ladder {' ; '.join(self.ladder)!r}" if self.ladder else f"uplink {self.uplink!r}"
            return (f"client lacks codec(s) {', '.join(missing)} needed by the run "
                    f"({up}, downlink {self.downlink!r}); it announced {sorted(cap.codecs)}")
        lacking = sorted(set(self.features) - set(cap.features))
        if lacking:
            return (f"client lacks protocol feature(s) {', '.join(lacking)} the run needs "
                    f"(\"scaffold\": client.objective = 'scaffold'; \"heterofl\": model.widths; \"secagg\": "
                    f"privacy.secure_aggregation = true); it announced {sorted(cap.features)}: upgrade the client")
        if self.regions and (REGION_FEATURE not in cap.features or not request.HasField("region")):
            return (f"this root takes the regional aggregators of {self.regions} regions (engine.region_aggregators = true), "
                    "not clients: a client dials its region's `fleetlearn aggregator`")
        if self.regions and request.region >= self.regions:
            return f"region {request.region} does not exist: the run has engine.regions = {self.regions} (regions 0 to {self.regions - 1})"
        if not self.regions and (REGION_FEATURE in cap.features or request.HasField("region")):
            return ("this server takes clients, not regional aggregators: start the root with engine.region_aggregators = true "
                    "(and engine.regions), or point the aggregator's clients at this server directly")
        if PROBE_FEATURE in cap.features and self.probe_refusal:
            return f"this run cannot check probe clients: {self.probe_refusal}"
        if self.model_digest:
            if not cap.model_digest:
                return f"client did not announce its model digest; the run trains model {self.model_digest}"
            if cap.model_digest != self.model_digest:
                return f"client model {cap.model_digest} differs from the run's model {self.model_digest} (architecture and sizes must match)"
        if self.model_width and len(cap.model_widths) and not any(abs(w - self.model_width) < 1e-9 for w in cap.model_widths):
            return f"client trains model widths {list(cap.model_widths)}; the run needs width {self.model_width}"
        if cap.memory_mb and cap.memory_mb < self.min_memory_mb:
            return f"client announces {cap.memory_mb} MiB of memory; the run needs at least {self.min_memory_mb} MiB"
        return None


@dataclass
class ClientSession:
    """A registered client as the server knows it (in memory: lost on restart, by design)."""

    client_id: int
    name: str
    session: str
    last_seen: float  # time.monotonic() of its last call
    runtime_version: str
    peer: str
    device: dict[str, float]
    capabilities: dict[str, Any]


@dataclass
class LinkEstimate:
    """What the server measured of one client's link and pace, for adaptive compression:
    smoothed over its updates (each new measurement weighs `LINK_SMOOTHING`)."""

    uplink_mbps: float  # payload bits over the seconds from the update's first message to its last chunk
    ready_s: float  # seconds from the round's start to the update's first message (download + compute)
    updates: int = 1


LINK_SMOOTHING = 0.5
UNMEASURED_MBPS = 1e4  # a client never measured and announcing no uplink: assume a fast link (least lossy rung)


@dataclass
class RoundState:
    """One dispatched round, from publication until it is closed."""

    round: int
    version: int
    task: Task | None  # released when the round closes
    cohort: frozenset[int]
    t0: float
    deadline_s: float
    out: "queue.Queue[Any]"
    pending: set[int] = field(default_factory=set)
    replied: set[int] = field(default_factory=set)
    dropped: set[int] = field(default_factory=set)
    uploading: set[int] = field(default_factory=set)
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # set when the round closes
    downlink_bytes: dict[int, int] = field(default_factory=dict)
    # Serialized payload chunks, shared by all streams: by model width (HeteroFL: each width's
    # sub-model; 0.0: the task's own payload).
    frames: dict[float, list[tuple[int, bytes]]] = field(default_factory=dict)
    widths: dict[int, float] = field(default_factory=dict)  # HeteroFL: each client's width this round
    payloads: dict[float, bytes] = field(default_factory=dict)  # HeteroFL: each width's sub-model payload
    codecs: dict[int, str] = field(default_factory=dict)  # adaptive compression: each client's rung this round
    label_classes: int = 0  # label_importance: the histogram length the task asks for (0 = none)
    open: bool = True
    closed_by: str = ""  # "deadline" | "complete" | "stopped" | "superseded" | "finished"
    # A task group open beside others (FedBuff: `FleetServer.open_group`), with its own deadline timer.
    concurrent: bool = False
    timer: Any = None

    def elapsed(self) -> float:
        return time.monotonic() - self.t0


class RefusalCounter:
    """Refusals by reason, per round, readable from any thread."""

    def __init__(self, keep_log: int = 256):
        self._lock = threading.Lock()
        self._by_round: dict[int, Counter[str]] = {}
        self._untaken: Counter[str] = Counter()
        self.log: deque[tuple[float, int, int | None, str, str]] = deque(maxlen=keep_log)

    def add(self, round: int, reason: str, client: int | None, detail: str) -> None:
        with self._lock:
            self._by_round.setdefault(round, Counter())[reason] += 1
            self._untaken[reason] += 1
            self.log.append((time.time(), round, client, reason, detail))

    def take(self) -> dict[str, int]:
        """Counts since the previous `take` (each refusal is taken exactly once)."""
        with self._lock:
            out, self._untaken = dict(self._untaken), Counter()
            return out

    def since(self, round: int) -> dict[str, int]:
        """Counts of refusals made while round >= `round` was the latest published."""
        with self._lock:
            total: Counter[str] = Counter()
            for r, c in self._by_round.items():
                if r >= round:
                    total.update(c)
            return dict(total)

    def total(self) -> dict[str, int]:
        return self.since(0)


class _Unparsable:
    """What the request deserializer returns for bytes that are not the expected message."""

    def __init__(self, what: str, error: str):
        self.what, self.error = what, error


def _safe_parser(cls: type[Message]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except (DecodeError, ValueError, RuntimeError) as exc:
            return _Unparsable(cls.DESCRIPTOR.name, str(exc))

    return parse


def _serialize_or_pass(msg: Any) -> bytes:
    """Response serializer that lets already-serialized frames through unchanged."""
    return msg if isinstance(msg, bytes) else msg.SerializeToString()


# A call whose stream ends before its first message: the client sent none, or gRPC cut the
# call for a message over its size limit (the client then sees RESOURCE_EXHAUSTED).
_CUT = " (or its first message was over the size limit)"
# Such a call is refused as malformed only after this pause: a call the client cancelled as it
# started (a heartbeat at shutdown), or one gRPC cut, ends its stream the same way, and the
# cancellation reaches the handler within the pause, so it is not counted as a refusal (a
# cancelled heartbeat was counted in about 3 % of cancellations, and failed a test now and then).
EMPTY_STREAM_GRACE_S = 0.05


def _retrieve(fut: "asyncio.Future[Any]") -> None:
    """Mark a finished read's outcome as seen (asyncio logs unseen exceptions at error level)."""
    if not fut.cancelled():
        fut.exception()


def _parsed(msg: Any) -> Any:
    if isinstance(msg, _Unparsable):
        raise Refusal("malformed", f"cannot parse {msg.what}: {msg.error}")
    return msg


def _finite(name: str, x: float, *, nonneg: bool = False, allow_nan: bool = False) -> None:
    if math.isnan(x) and allow_nan:
        return
    if not math.isfinite(x) or (nonneg and x < 0):
        raise Refusal("malformed", f"{name} = {x!r} must be a finite{' non-negative' if nonneg else ''} number")


class FleetServer:
    """The service and the state behind it; lives on one asyncio loop."""

    def __init__(
        self,
        tokens: TokenStore,
        requirements: RunRequirements,
        limits: Limits = Limits(),
        heartbeat_interval_s: float = 5.0,
        heartbeat_timeout_s: float | None = None,
        keep_rounds: int = 16,
        submodels: Any = None,
        membership: Any = None,
    ):
        self.tokens = tokens
        # A regional aggregator's server (`engine.regions.RegionMembership`): clients of other
        # regions are refused at registration ("wrong_region").  None: every token holder.
        self.membership = membership
        # A root of regional aggregators: each round's `UpdateMeta.region` by aggregator (recent rounds).
        self.region_reports: dict[int, dict[int, dict[str, Any]]] = {}
        self._keep_rounds = keep_rounds
        # HeteroFL (`learners.heterofl.HeteroFLLearner`) or None: each client's width is assigned at
        # registration from its declared memory (`width_for_device`), its tasks carry only that width's
        # sub-model, and its update is the sub-model's delta.
        self.submodels = submodels
        self.widths: dict[int, float] = {}  # client id -> width assigned at its last registration
        self.requirements = requirements
        self.limits = limits
        self.heartbeat_interval_s = heartbeat_interval_s
        self.heartbeat_timeout_s = heartbeat_timeout_s if heartbeat_timeout_s is not None else 3.0 * heartbeat_interval_s
        self.clients: dict[int, ClientSession] = {}
        self.round: RoundState | None = None  # the latest dispatched round (or task group)
        self.groups: dict[int, RoundState] = {}  # open task groups by round (FedBuff: `open_group`)
        self.history: deque[RoundState] = deque(maxlen=keep_rounds)  # recent closed rounds, for precise refusals
        self.refusals = RefusalCounter()
        self.finished = False
        self.finished_reason = ""
        self.told_finished: set[int] = set()  # clients that have heard the run finished
        self._changed: asyncio.Event | None = None
        self._watcher: asyncio.Task | None = None
        self._deadline_timer: asyncio.TimerHandle | None = None
        # Adaptive compression: the ladder's upper-bound sizes, and each client's measured link.
        self.adaptive: AdaptiveCompression | None = None
        if requirements.ladder:
            if len(requirements.rung_bytes) != len(requirements.ladder):
                raise ValueError("adaptive compression over gRPC needs the model's ParamSpec (the rungs' sizes): use RunRequirements.for_run(spec, ladder=...)")
            self.adaptive = AdaptiveCompression(requirements.ladder, 0, level_bytes=[hi for _, hi in requirements.rung_bytes])
        self.links: dict[int, LinkEstimate] = {}
        # Calls holding a slot (see `_open_call`), in total and by client id.
        self._calls: dict[int, int] = {}
        self._calls_total = 0
        # Secure aggregation: the round's SecAgg stages (`run_secagg`), the latest one kept so
        # late and replayed messages are refused precisely.
        self.secagg: SecAggRound | None = None

    # -- lifecycle (on the loop) ------------------------------------------------------
    def start(self) -> None:
        self._changed = asyncio.Event()
        self._watcher = asyncio.get_running_loop().create_task(self._watch_liveness())

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        for rs in self._open_rounds():
            self._end_round(rs, "stopped", "the server stopped")

    def handler(self) -> grpc.GenericRpcHandler:
        """The service's method handlers, with failure-proof request parsing.

        Every method reads its request as a *stream* on this side (clients call Register,
        Heartbeat and PullTask as unary requests, as before: the wire is the same).  gRPC
        reads a unary request before the handler runs, with no time limit, so a call that
        never sends its message would sit in memory unauthenticated; with a request stream
        the handler runs as soon as the call opens, checks the token in the call metadata,
        takes a call slot (`Limits.max_calls*`) and only then reads, within
        `Limits.first_message_s`."""
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Register": grpc.stream_unary_rpc_method_handler(
                    self._unary(self.Register, "RegisterRequest"), request_deserializer=_safe_parser(pb.RegisterRequest),
                    response_serializer=pb.RegisterReply.SerializeToString,
                ),
                "Heartbeat": grpc.stream_unary_rpc_method_handler(
                    self._unary(self.Heartbeat, "HeartbeatRequest"), request_deserializer=_safe_parser(pb.HeartbeatRequest),
                    response_serializer=pb.HeartbeatReply.SerializeToString,
                ),
                "PullTask": grpc.stream_stream_rpc_method_handler(
                    self.PullTask, request_deserializer=_safe_parser(pb.PullTaskRequest), response_serializer=_serialize_or_pass
                ),
                "PushUpdate": grpc.stream_unary_rpc_method_handler(
                    self.PushUpdate, request_deserializer=_safe_parser(pb.UpdateChunk), response_serializer=pb.PushReply.SerializeToString
                ),
                "SecAggStep": grpc.stream_unary_rpc_method_handler(
                    self._unary(self.SecAggStep, "SecAggRequest"), request_deserializer=_safe_parser(pb.SecAggRequest),
                    response_serializer=pb.SecAggReply.SerializeToString,
                ),
            },
        )

    def _notify(self) -> None:
        """Wake every long poll: something they wait for may have changed."""
        assert self._changed is not None
        self._changed.set()
        self._changed = asyncio.Event()

    # -- refusals --------------------------------------------------------------------
    async def _refuse(self, context: grpc.aio.ServicerContext, r: Refusal, client: int | None) -> None:
        self.refusals.add(self.round.round if self.round else 0, r.reason, client, r.detail)
        log.debug("refused %s (client %s, peer %s): %s", r.reason, client, context.peer(), r.detail)
        await context.abort(r.code, r.detail)

    async def _internal(self, context: grpc.aio.ServicerContext, exc: Exception, client: int | None) -> None:
        log.exception("internal error while serving %s", context.peer())
        await self._refuse(context, Refusal("internal", f"server error ({type(exc).__name__}); the request was not processed"), client)

    # -- identity --------------------------------------------------------------------
    def _authenticate(self, context: grpc.aio.ServicerContext) -> TokenCheck:
        token = None
        for key, value in context.invocation_metadata() or ():
            if key == TOKEN_HEADER:
                if isinstance(value, bytes):
                    value = value.decode("latin-1")
                token = value[7:].strip() if value.startswith("Bearer ") else None
                break
        if token is None:
            raise Refusal("bad_token", f"no token: send metadata '{TOKEN_HEADER}: Bearer <token>'")
        check = self.tokens.check(token)
        if check.status == "revoked":
            raise Refusal("revoked_token", f"the token of client {check.name!r} was revoked")
        if check.status != "ok":
            raise Refusal("bad_token", "unknown token")
        return check

    def _session(self, check: TokenCheck, client_id: int, session: str) -> ClientSession:
        """The caller's registration, given its checked token: its client id and session."""
        if client_id != check.client_id:
            raise Refusal("wrong_client", f"the token belongs to client {check.client_id}, not to client {client_id}")
        cs = self.clients.get(client_id)
        if cs is None:
            raise Refusal("unknown_client", f"client {client_id} is not registered (the server may have restarted): register again")
        if not hmac.compare_digest(cs.session.encode(), session.encode()):
            raise Refusal("unknown_client", f"session of client {client_id} is not current (it registered again since): register again")
        cs.last_seen = time.monotonic()
        return cs

    # -- calls: authenticated from metadata, slots, bounded reads --------------------------
    def _open_call(self, context: grpc.aio.ServicerContext) -> TokenCheck:
        """Authenticate a call from its metadata, before any message is read, and take one
        of its client's call slots (give it back with `_close_call`)."""
        check = self._authenticate(context)
        cid = check.client_id
        assert cid is not None
        lim = self.limits
        if self._calls_total >= lim.max_calls:
            raise Refusal("busy", f"the server has {self._calls_total} calls in progress, its limit (max_calls = {lim.max_calls}); retry later")
        held = self._calls.get(cid, 0)
        if held >= lim.max_calls_per_client:
            raise Refusal("too_many_calls", f"client {cid} already has {held} calls in progress; "
                                            f"at most {lim.max_calls_per_client} at once (max_calls_per_client)")
        self._calls[cid] = held + 1
        self._calls_total += 1
        return check

    def _close_call(self, check: TokenCheck) -> None:
        cid = check.client_id
        assert cid is not None
        left = self._calls[cid] - 1
        if left:
            self._calls[cid] = left
        else:
            del self._calls[cid]
        self._calls_total -= 1

    def calls_in_progress(self) -> tuple[int, dict[int, int]]:
        """(calls holding a slot, by client id)."""
        return self._calls_total, dict(self._calls)

    async def _first_message(self, request_iterator: Any, what: str) -> Any:
        """The call's first message, parsed; None if the stream ends without one (after
        `EMPTY_STREAM_GRACE_S`, in which a cancelled call ends).  A call that sends nothing
        within `first_message_s` is refused ("timeout")."""
        t = self.limits.first_message_s
        try:
            async with asyncio.timeout(t):
                msg = await request_iterator.__anext__()
        except TimeoutError:
            raise Refusal("timeout", f"no {what} within {t:.3g}s of the call's start (first_message_s)") from None
        except StopAsyncIteration:
            await asyncio.sleep(EMPTY_STREAM_GRACE_S)  # a cancelled call is cancelled here, uncounted
            return None
        return _parsed(msg)

    def _unary(self, method: Callable[[Any, grpc.aio.ServicerContext, TokenCheck], Any], what: str) -> Callable[..., Any]:
        """A request-stream handler for a unary method: authenticate, take a slot, read the one
        request in time, call `method(request, context, check)`; every refusal counted."""

        async def call(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            client = check = None
            try:
                check = self._open_call(context)
                client = check.client_id
                request = await self._first_message(request_iterator, what)
                if request is None:
                    raise Refusal("malformed", f"no {what} in the call{_CUT}")
                return await method(request, context, check)
            except Refusal as r:
                await self._refuse(context, r, client)
            except Exception as exc:  # noqa: BLE001 - a bug must not take the server down
                if isinstance(exc, grpc.aio.AbortError):
                    raise
                await self._internal(context, exc, client)
            finally:
                if check is not None:
                    self._close_call(check)
            raise AssertionError("unreachable")  # abort() raises

        call.__name__ = method.__name__
        return call

    # -- Register --------------------------------------------------------------------
    async def Register(self, request: pb.RegisterRequest, context: grpc.aio.ServicerContext, check: TokenCheck) -> pb.RegisterReply:
        """Join the run (refusals and errors are handled by `_unary`)."""
        self._validate_register(request)
        why = self.requirements.refusal(request)
        if why:
            raise Refusal("incompatible", why)
        assert check.client_id is not None and check.name is not None
        if self.membership is not None and (why := self.membership.refusal(check.client_id)):
            raise Refusal("wrong_region", why)
        region = self._region_of_aggregator(check.client_id, request)
        width = self._assign_width(check.client_id, request.capabilities)
        cs = ClientSession(
            client_id=check.client_id,
            name=check.name,
            session=secrets.token_urlsafe(16),
            last_seen=time.monotonic(),
            runtime_version=request.runtime_version,
            peer=context.peer() or "",
            device={"compute_sps": request.device.compute_sps, "uplink_mbps": request.device.uplink_mbps, "downlink_mbps": request.device.downlink_mbps},
            capabilities={
                "codecs": list(request.capabilities.codecs),
                "model_widths": list(request.capabilities.model_widths),
                "memory_mb": int(request.capabilities.memory_mb),
                "features": list(request.capabilities.features),
                **({"model_width": width} if width else {}),
                **({"region": region} if region is not None else {}),
            },
        )
        self.clients[cs.client_id] = cs  # replaces an older session of the same client
        self._secagg_forget(cs.client_id)
        if self.finished:
            self.told_finished.add(cs.client_id)
        self._notify()
        log.info("client %d (%s) registered from %s", cs.client_id, cs.name, cs.peer)
        req = self.requirements
        return pb.RegisterReply(
            client_id=cs.client_id, session=cs.session, accepted=True, reason="",
            heartbeat_interval_s=self.heartbeat_interval_s, downlink_codec=req.downlink, uplink_codec=req.uplink,
            model_digest=req.model_digest or "", run_finished=self.finished, chunk_bytes=self.limits.chunk_bytes,
            model_width=width,
        )

    def _assign_width(self, client: int, cap: pb.Capabilities) -> float:
        """HeteroFL: the client's width by the run's width rule from its declared memory
        (`submodels.width_for_device`, the rule the simulation uses), one it announced it can
        train, then recorded (`set_width`); 0.0 without HeteroFL.  A client that re-registers
        at another width while selected leaves the open round (its task was for the old width)."""
        if self.submodels is None:
            return 0.0
        try:
            width = float(self.submodels.width_for_device(client, float(cap.memory_mb)))
        except ValueError as exc:
            raise Refusal("incompatible", str(exc)) from None
        if not any(abs(w - width) < 1e-9 for w in cap.model_widths):
            raise Refusal("incompatible", f"the run assigns this client model width {width:g} (memory {cap.memory_mb} MiB, "
                                          f"width rule {self.submodels.width_rule!r}); it announced widths {list(cap.model_widths)}")
        rs = self._task_round(client)
        if rs is not None and rs.open and client in rs.pending and rs.widths.get(client, width) != width:
            self._drop(rs, client, f"it registered again at model width {width:g}; its task was for width {rs.widths[client]:g}")
        self.submodels.set_width(client, width)
        self.widths[client] = width
        return width

    def _region_of_aggregator(self, client: int, request: pb.RegisterRequest) -> int | None:
        """A root of regional aggregators: the region this aggregator registers for (checked
        against `engine.regions` by `RunRequirements.refusal`); refused while another live
        aggregator holds it.  None on any other server."""
        if not self.requirements.regions:
            return None
        region = int(request.region)
        live = set(self.available())
        holder = next((c for c, cs in self.clients.items() if c != client and c in live and cs.capabilities.get("region") == region), None)
        if holder is not None:
            raise Refusal("wrong_region", f"region {region} is served by aggregator {holder}, which is connected; "
                                          "one aggregator per region (revoke its token, or give this one another region)")
        return region

    def aggregator_regions(self) -> dict[int, int]:
        """Registered regional aggregators: client id -> the region it registered for."""
        return {c: int(cs.capabilities["region"]) for c, cs in self.clients.items() if "region" in cs.capabilities}

    def _validate_register(self, r: pb.RegisterRequest) -> None:
        lim = self.limits
        for name, text in (("client_name", r.client_name), ("runtime_version", r.runtime_version)):
            if len(text) > lim.max_text_chars:
                raise Refusal("malformed", f"{name} has {len(text)} characters; at most {lim.max_text_chars}")
        cap = r.capabilities
        for name, items in (("capabilities.codecs", cap.codecs), ("capabilities.model_widths", cap.model_widths),
                            ("capabilities.features", cap.features)):
            if len(items) > lim.max_list_items:
                raise Refusal("malformed", f"{name} has {len(items)} entries; at most {lim.max_list_items}")
        for what, names in (("codecs", cap.codecs), ("features", cap.features)):
            for c in names:
                if not c or len(c) > lim.max_text_chars:
                    raise Refusal("malformed", f"capabilities.{what} has an empty or overlong name ({len(c)} characters)")
        if len(cap.model_digest) > lim.max_text_chars:
            raise Refusal("malformed", f"capabilities.model_digest has {len(cap.model_digest)} characters")
        for w in cap.model_widths:
            _finite("capabilities.model_widths[]", w, nonneg=True)
        for name in ("compute_sps", "uplink_mbps", "downlink_mbps"):
            _finite(f"device.{name}", getattr(r.device, name), nonneg=True)

    # -- Heartbeat -------------------------------------------------------------------
    async def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext, check: TokenCheck) -> pb.HeartbeatReply:
        cs = self._session(check, request.client_id, request.session)
        rs = self.round
        if self.finished:
            self.told_finished.add(cs.client_id)
        return pb.HeartbeatReply(
            run_finished=self.finished,
            current_round=rs.round if rs else 0,
            has_task=any(cs.client_id in r.pending for r in self._open_rounds()),
            heartbeat_interval_s=self.heartbeat_interval_s,
        )

    # -- PullTask --------------------------------------------------------------------
    async def PullTask(self, request_iterator: Any, context: grpc.aio.ServicerContext):
        client = check = None
        try:
            check = self._open_call(context)
            client = check.client_id
            request = await self._first_message(request_iterator, "PullTaskRequest")
            if request is None:
                raise Refusal("malformed", f"no PullTaskRequest in the call{_CUT}")
            cs = self._session(check, request.client_id, request.session)
            _finite("wait_s", request.wait_s, nonneg=True)
            give_up = time.monotonic() + min(request.wait_s, self.limits.max_wait_s)
            while True:
                if self.finished:
                    yield pb.TaskChunk(finished=pb.RunFinished(reason=self.finished_reason or "the run finished"))
                    self.told_finished.add(cs.client_id)
                    return
                rs = self._task_round(client)
                if rs is not None and rs.open and client in rs.pending and rs.round > request.after_round:
                    break
                left = give_up - time.monotonic()
                if left <= 0:
                    # Not a refusal: the normal answer of a long poll that found nothing.
                    await context.abort(
                        grpc.StatusCode.UNAVAILABLE,
                        f"no task for client {client} yet; poll again",
                        trailing_metadata=((RETRY_AFTER_HEADER, "0"),),
                    )
                changed = self._changed
                assert changed is not None
                try:
                    await asyncio.wait_for(changed.wait(), left)
                except asyncio.TimeoutError:
                    pass
                if self.clients.get(client) is not cs:
                    raise Refusal("unknown_client", f"client {client} registered again while polling: use the new session")
            task = rs.task
            assert task is not None
            width = rs.widths.get(client, 0.0)
            payload = rs.payloads[width] if width else task.payload
            meta = pb.TaskMeta(
                round=task.round, version=task.version, codec=task.codec, config_json=self._config_json(task, client),
                deadline_s=task.deadline_s or 0.0, remaining_s=max(rs.deadline_s - rs.elapsed(), 1e-6) if task.deadline_s else 0.0,
                payload_bytes=len(payload), uplink_codec=rs.codecs.get(client, self.requirements.uplink),
                control_bytes=len(task.control), model_width=width, secagg=self.requirements.secagg,
                secagg_stage_s=rs.deadline_s if self.requirements.secagg else 0.0,
            )
            yield pb.TaskChunk(meta=meta)
            sent = 0
            for size, frame in self._task_frames(rs, width):
                if not rs.open:
                    raise Refusal("after_deadline" if rs.closed_by == "deadline" else "round_closed",
                                  f"round {rs.round} closed ({rs.closed_by}) while its task was being sent")
                yield frame
                sent += size
                rs.downlink_bytes[client] = sent
            cs.last_seen = time.monotonic()
        except Refusal as r:
            await self._refuse(context, r, client)
        except Exception as exc:  # noqa: BLE001
            if isinstance(exc, (grpc.aio.AbortError, asyncio.CancelledError)):
                raise
            await self._internal(context, exc, client)
        finally:
            if check is not None:
                self._close_call(check)

    @staticmethod
    def _config_json(task: Task, client: int) -> str:
        """The task spec as this client may see it (`TaskSpec.for_client`: clustered FL's
        entry lists only this client's own candidates, not the others' memberships)."""
        return task.spec.for_client(client).to_json()

    def _task_frames(self, rs: RoundState, width: float = 0.0) -> list[tuple[int, bytes]]:
        """The round's payload chunks (the model, then SCAFFOLD's control variate if any)
        as serialized `TaskChunk` messages, built once per round (HeteroFL: once per width,
        from that width's sub-model) and shared by every client's stream: the downlink costs
        one extra copy of the model, not one per selected client."""
        frames = rs.frames.get(width)
        if frames is None:
            assert rs.task is not None
            payload = rs.payloads[width] if width else rs.task.payload
            body = payload + rs.task.control if rs.task.control else payload
            frames = rs.frames[width] = [
                (len(data), pb.TaskChunk(data=pb.PayloadChunk(offset=offset, data=data)).SerializeToString())
                for offset, data in iter_chunks(body, self.limits.chunk_bytes)
            ]
        return frames

    # -- PushUpdate ------------------------------------------------------------------
    async def PushUpdate(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> pb.PushReply:
        client = check = None
        rs: RoundState | None = None
        try:
            check = self._open_call(context)
            client = check.client_id
            first = await self._first_message(request_iterator, "UpdateMeta")
            if first is None:
                raise Refusal("malformed", f"empty PushUpdate stream: send UpdateMeta, then the payload chunks{_CUT}")
            if first.WhichOneof("kind") != "meta":
                raise Refusal("malformed", f"the first message of PushUpdate must be UpdateMeta, got {first.WhichOneof('kind') or 'an empty chunk'}")
            m = first.meta
            cs = self._session(check, m.client_id, m.session)
            rs = self._admit(client, m, starting=True)
            self._validate_update_meta(m, rs)
            first_at, ready_s = time.monotonic(), rs.elapsed()
            rs.uploading.add(client)
            try:
                # No cap on concurrent uploads on purpose: a semaphore would serialise slow
                # links (1000 phones at 1 Mbit/s) and let a few stalled clients block the
                # rest; memory is bounded by cohort x update size instead.
                assembler = PayloadAssembler(m.payload_bytes, self.limits.max_update_bytes, self.limits.chunk_bytes, "update payload")
                while (chunk := await self._next_chunk(request_iterator, rs, client)) is not None:
                    chunk = _parsed(chunk)
                    kind = chunk.WhichOneof("kind")
                    if kind != "data":
                        raise Refusal("malformed", "UpdateMeta sent twice in one PushUpdate" if kind == "meta" else "empty UpdateChunk")
                    assembler.add(chunk.data.offset, chunk.data.data)
                payload = assembler.finish()
            finally:
                rs.uploading.discard(client)
            secagg_dump("update", rs.round, client, first.SerializeToString() + payload)  # testing aid (FLEETLEARN_SECAGG_DUMP_DIR)
            if not self.requirements.regions:  # a region's sum has no codec header (its size was checked)
                self._check_payload_header(payload, m.codec, self._update_dim(rs, client))
            cs.last_seen = time.monotonic()
            link = self._measure(client, len(payload), cs.last_seen - first_at, ready_s)
            rs = self._admit(client, m, starting=False)  # the round may have closed during the upload
            mt = m.metrics
            update = Update(
                client_id=client,
                round=int(m.round),
                base_version=int(m.base_version),
                payload=payload,
                codec=m.codec,
                num_examples=int(m.num_examples),
                metrics=ClientMetrics(
                    loss_before=mt.loss_before, loss_after=mt.loss_after, accuracy=mt.accuracy,
                    compute_seconds=mt.compute_seconds, steps=int(mt.steps), samples=int(mt.samples),
                    label_counts=tuple(int(v) for v in mt.label_counts) if len(mt.label_counts) else None,
                    oversampled=int(mt.oversampled),
                    personal_accuracy=mt.personal_accuracy if mt.HasField("personal_accuracy") else math.nan,
                    global_accuracy=mt.global_accuracy if mt.HasField("global_accuracy") else math.nan,
                ),
                downlink_bytes=rs.downlink_bytes.get(client, int(m.downlink_bytes)),
                extra={"transport": "grpc", "peer": context.peer() or "", "uplink_mbps": link.uplink_mbps, "ready_s": link.ready_s},
            )
            if self.requirements.regions:
                report = region_report(m.region)
                update.extra["region"] = report
                self.region_reports.setdefault(rs.round, {})[client] = report
                for old in [r for r in self.region_reports if r <= rs.round - self._keep_rounds]:
                    del self.region_reports[old]
            rs.pending.discard(client)
            rs.replied.add(client)
            rs.out.put(Reply(update, rs.elapsed()))
            if not rs.pending:
                self._end_round(rs, "complete", "")
            return pb.PushReply(accepted=True, reason="")
        except Refusal as r:
            await self._refuse(context, r, client)
        except Exception as exc:  # noqa: BLE001
            if isinstance(exc, grpc.aio.AbortError):
                raise
            await self._internal(context, exc, client)
        finally:
            if check is not None:
                self._close_call(check)
        raise AssertionError("unreachable")

    async def _next_chunk(self, request_iterator: Any, rs: RoundState, client: int) -> Any:
        """The next message of an upload, or None at its end.  Refused as soon as the round
        closes, so a stalled upload cannot hold its buffer past the deadline; and when no
        message comes within `upload_idle_s` ("stalled"), the client is dropped from the
        round with that reason (without a deadline the round would wait `max_round_s`).

        The read runs as a task of its own, which must never end with an exception nobody
        reads: gRPC cuts a call itself (a message over its size limit, a client that goes
        away) by cancelling this handler, and the read then ends in StopAsyncIteration."""
        nxt = asyncio.ensure_future(request_iterator.__anext__())
        nxt.add_done_callback(_retrieve)
        closed = asyncio.ensure_future(rs.closed.wait())
        idle = self.limits.upload_idle_s
        try:
            done, _ = await asyncio.wait((nxt, closed), timeout=idle, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            if not nxt.done():
                nxt.cancel()
        if nxt not in done:
            if rs.closed.is_set():
                reason = "after_deadline" if rs.closed_by == "deadline" else "round_closed"
                raise Refusal(reason, f"round {rs.round} closed ({rs.closed_by}) before the update was complete")
            why = f"its upload stalled: no message for {idle:.3g}s (upload_idle_s)"
            self._drop(rs, client, why)
            raise Refusal("stalled", f"client {client}: {why}; dropped from round {rs.round}")
        try:
            return nxt.result()
        except StopAsyncIteration:
            return None

    def _update_dim(self, rs: RoundState, client: int) -> int | None:
        """The dimension of the vector this client's update encodes: the model's, or under
        HeteroFL its width's sub-model's."""
        width = rs.widths.get(client)
        return self.submodels.sub_dim(width) if width else self.requirements.dim

    def _check_payload_header(self, payload: bytes, codec: str, dim_expected: int | None = None) -> None:
        """Refuse an update whose codec header announces another dimension than the run's
        model (or a zstd body larger than that dimension allows) before it reaches the
        Coordinator: cheap (a few header bytes), counted as `wrong_shape`, and it names
        the numbers.  The decoder checks the same again (`wire.read_header(dim=)`)."""
        req = self.requirements
        want = req.dim if dim_expected is None else dim_expected
        if want is None:
            return
        at = req.block_header_bytes
        if len(payload) < at + wire.HEADER.size + wire.ZSTD_HEAD.size:
            return  # too short to carry a body: the decoder refuses it with its own reason
        magic, _version, support, _value, dim = wire.HEADER.unpack_from(payload, at)
        if magic != wire.MAGIC:
            return
        if dim != want:
            what = "the run's model" if want == req.dim else "this client's sub-model"
            raise Refusal("wrong_shape", f"update payload ({codec}) is for a vector of dim {dim}; {what} has {want}")
        if support & wire.SUPPORT_ZSTD_FLAG:
            (size,) = wire.ZSTD_HEAD.unpack_from(payload, at + wire.HEADER.size)
            if size > wire.max_body_bytes(dim):
                raise Refusal("wrong_shape", f"update payload's zstd body announces {size} bytes; "
                                             f"a payload of dim {dim} holds at most {wire.max_body_bytes(dim)}")

    def _admit(self, client: int, m: pb.UpdateMeta, starting: bool) -> RoundState:
        """The open round this update belongs to, or the precise reason it belongs to none."""
        rs = self._group_of(client, int(m.round)) or self.round
        if rs is None or m.round > rs.round:
            raise Refusal("wrong_round", f"there is no round {m.round} (latest round: {rs.round if rs else 'none yet'})")
        # A canary dispatches a round number twice (each arm its own cohort, one after the
        # other): the round this client was asked for is the latest one whose cohort has it.
        past = None if m.round == rs.round and client in rs.cohort else next(
            (h for h in reversed(self.history) if h.round == m.round and h is not rs and client in h.cohort), None)
        if m.round < rs.round or past is not None:
            if past is not None and client in past.dropped and past.closed_by == "deadline":
                raise Refusal("after_deadline", f"round {m.round} ended at its deadline of {past.deadline_s:.3g}s; latest round is {rs.round}")
            raise Refusal("replay", f"round {m.round} is over (latest round: {rs.round}); updates are accepted only for the open round")
        if client not in rs.cohort:
            raise Refusal("not_selected", f"client {client} is not in the cohort of round {rs.round}")
        if client in rs.replied:
            raise Refusal("duplicate", f"client {client} already sent its update for round {rs.round}")
        if not rs.open or client in rs.dropped:
            if rs.closed_by == "deadline":
                raise Refusal("after_deadline", f"round {rs.round} ended at its deadline of {rs.deadline_s:.3g}s")
            if client in rs.dropped and rs.open:
                raise Refusal("dropped", f"client {client} was reported dropped from round {rs.round} (missed heartbeats)")
            raise Refusal("round_closed", f"round {rs.round} stopped collecting updates ({rs.closed_by})")
        if m.base_version != rs.version:
            raise Refusal("wrong_version", f"update computed from model version {m.base_version}; round {rs.round} trains version {rs.version}")
        if starting and client in rs.uploading:
            raise Refusal("duplicate", f"an update of client {client} for round {rs.round} is already being uploaded")
        return rs

    def _measure(self, client: int, nbytes: int, seconds: float, ready_s: float) -> LinkEstimate:
        """Fold one upload's measured throughput and readiness into the client's estimate."""
        mbps = nbytes * 8.0 / max(seconds, 1e-4) / 1e6
        old = self.links.get(client)
        if old is None:
            est = LinkEstimate(mbps, ready_s)
        else:
            a = LINK_SMOOTHING
            est = LinkEstimate(a * mbps + (1 - a) * old.uplink_mbps, a * ready_s + (1 - a) * old.ready_s, old.updates + 1)
        self.links[client] = est
        return est

    def _plan_rungs(self, task: Task, clients: list[int]) -> dict[int, str]:
        """Adaptive compression: each client's rung for this task, by the rule the simulation
        uses (`AdaptiveCompression.plan_task`), from measured links: a client's uplink and
        readiness as measured on its earlier updates; until then its announced uplink
        (else a fast link) and the cohort's median readiness (else 0)."""
        entry = task.spec.get(AdaptiveEntry)
        if self.adaptive is None or not clients or entry is None:
            return {}
        known = [self.links[c].ready_s for c in clients if c in self.links]
        typical = float(np.median(known)) if known else 0.0
        mbps, before = [], []
        for c in clients:
            est, cs = self.links.get(c), self.clients.get(c)
            announced = float(cs.device.get("uplink_mbps", 0.0)) if cs is not None else 0.0
            mbps.append(est.uplink_mbps if est is not None else (announced if announced > 0 else UNMEASURED_MBPS))
            before.append(est.ready_s if est is not None else typical)
        plan = self.adaptive.plan_task(entry, np.array(mbps), 0.0, np.array(before))
        if plan is None:
            return {}
        return {c: self.adaptive.ladder[int(lv)] for c, lv in zip(clients, plan.levels)}

    def _validate_region_meta(self, m: pb.UpdateMeta) -> None:
        """A regional aggregator's forward: the region it registered for, a finite positive
        weight, and the size of a region's sum (`engine.regions.pack_region_sum`)."""
        if m.codec != REGION_SUM_CODEC:
            raise Refusal("wrong_codec", f"update encoded with {m.codec!r}; a regional aggregator forwards its region's sum "
                                         f"(codec {REGION_SUM_CODEC!r})")
        if not m.HasField("region"):
            raise Refusal("malformed", "a regional aggregator's update must carry UpdateMeta.region (its region, weight and clients)")
        cs = self.clients.get(int(m.client_id))
        registered = cs.capabilities.get("region") if cs is not None else None
        if m.region.region != registered:
            raise Refusal("wrong_region", f"a forward for region {m.region.region}; aggregator {m.client_id} registered for region {registered}")
        _finite("region.weight", m.region.weight, nonneg=True)
        if m.region.weight <= 0:
            raise Refusal("malformed", f"region.weight = {m.region.weight!r}: a region with no accepted update forwards nothing")
        if m.region.clients > m.region.selected:
            raise Refusal("malformed", f"region.clients = {m.region.clients} exceeds region.selected = {m.region.selected}")
        want = self.requirements.update_bytes
        if want is not None and m.payload_bytes != want:
            raise Refusal("wrong_shape", f"a region's sum of {m.payload_bytes} bytes cannot be the model's: it is {want} bytes "
                                         f"({want // 8 - 1} float64 values and the weight)")

    def _validate_update_meta(self, m: pb.UpdateMeta, rs: RoundState) -> None:
        req = self.requirements
        if req.regions:
            self._validate_region_meta(m)
        elif m.HasField("region"):
            raise Refusal("malformed", "UpdateMeta.region is sent by regional aggregators, to a root with engine.region_aggregators = true")
        chain = rs.codecs.get(int(m.client_id), req.uplink)
        if not req.regions and _normalise_chain(m.codec) != chain:
            if req.ladder:
                raise Refusal("wrong_codec", f"update encoded with {m.codec!r}; round {rs.round} asked client {m.client_id} for rung {chain!r} of the adaptive ladder")
            raise Refusal("wrong_codec", f"update encoded with {m.codec!r}; the run's uplink chain is {req.uplink!r}")
        if m.num_examples < 0:
            raise Refusal("malformed", f"num_examples = {m.num_examples} is negative")
        mt = m.metrics
        for name in ("loss_before", "loss_after", "accuracy"):
            v = getattr(mt, name)
            if math.isinf(v):
                raise Refusal("malformed", f"metrics.{name} = {v} is infinite")
        for name in ("accuracy", "personal_accuracy", "global_accuracy"):
            v = getattr(mt, name)
            if not (math.isnan(v) or 0.0 <= v <= 1.0):
                raise Refusal("malformed", f"metrics.{name} = {v} is not an accuracy in [0, 1]")
        _finite("metrics.compute_seconds", mt.compute_seconds, nonneg=True, allow_nan=True)
        if mt.steps < 0 or mt.samples < 0:
            raise Refusal("malformed", f"metrics.steps = {mt.steps} and metrics.samples = {mt.samples} must be non-negative")
        # label_importance weighting: the task asked for a histogram of `classes` classes of
        # the client's own training labels, which must add up to the examples it claims.
        classes = rs.label_classes
        if classes and (len(mt.label_counts) != classes or sum(mt.label_counts) != m.num_examples):
            raise Refusal("malformed", f"metrics.label_counts has {len(mt.label_counts)} classes summing to {sum(mt.label_counts)}; "
                                       f"round {rs.round} asked for {classes} classes summing to num_examples = {m.num_examples}")
        if not classes and len(mt.label_counts):
            raise Refusal("malformed", f"metrics.label_counts sent, but round {rs.round} did not ask for a label histogram")
        if m.payload_bytes > self.limits.max_update_bytes:
            raise Refusal("oversized", f"update payload of {m.payload_bytes} bytes exceeds the limit of {self.limits.max_update_bytes} bytes")
        if req.regions:
            return
        if req.secagg:
            if m.payload_bytes:
                raise Refusal("wrong_shape", f"update payload of {m.payload_bytes} bytes: under secure aggregation the update stays on "
                                             "the device (PushUpdate carries no payload; the masked row travels in SecAggStep)")
            return
        exact, most = req.rung_bytes[req.ladder.index(chain)] if req.ladder and req.rung_bytes else (req.update_bytes, req.update_bytes_max)
        width = rs.widths.get(int(m.client_id))
        if width:  # HeteroFL: the client's sub-model, not the whole model
            exact, most = _chain_bytes(chain, self.submodels.sub_dim(width))
        if exact is not None and m.payload_bytes != exact:
            raise Refusal("wrong_shape", f"update payload of {m.payload_bytes} bytes cannot be the model's: uplink {chain!r} sends exactly {exact} bytes")
        if most is not None and m.payload_bytes > most:
            raise Refusal("wrong_shape", f"update payload of {m.payload_bytes} bytes cannot be the model's: uplink {chain!r} sends at most {most} bytes")

    # -- rounds (called on the loop by GrpcTransport) ----------------------------------
    def open_round(self, task: Task, cohort: Iterable[int], deadline_s: float, payloads: dict[float, bytes] | None = None,
                   out: Any = None, concurrent: bool = False) -> RoundState:
        """Publish `task` to `cohort`; replies and dropouts go to the returned round's queue
        (`out`, or a new queue).  HeteroFL: `payloads` holds each width's sub-model payload;
        a client gets its own.  `concurrent`: see `open_group`."""
        if not concurrent and self.round is not None and self.round.open:
            self._end_round(self.round, "superseded", f"round {task.round} started before this one ended")
        rs = RoundState(
            round=task.round, version=task.version, task=task, cohort=frozenset(int(c) for c in cohort),
            t0=time.monotonic(), deadline_s=deadline_s, out=out if out is not None else queue.Queue(), concurrent=concurrent,
        )
        rs.pending = set(rs.cohort)
        if self.submodels is not None:
            rs.payloads = dict(payloads or {})
            rs.widths = {c: self.widths[c] for c in rs.cohort if c in self.widths and self.widths[c] in rs.payloads}
        rs.codecs = self._plan_rungs(task, sorted(rs.cohort))
        hist = task.spec.get(LabelHistogramEntry)
        rs.label_classes = hist.classes if hist is not None else 0
        self.round = rs
        self.history.append(rs)
        now = time.monotonic()
        active = self.tokens.active_ids()
        for cid in sorted(rs.cohort):
            cs = self.clients.get(cid)
            if cs is None or cid not in active:
                self._drop(rs, cid, "not connected when the round was dispatched")
            elif now - cs.last_seen > self.heartbeat_timeout_s:
                self._drop(rs, cid, f"no heartbeat for {now - cs.last_seen:.1f}s when the round was dispatched")
            elif self.submodels is not None and cid not in rs.widths:
                self._drop(rs, cid, "no sub-model for its model width in this round's task")
        if rs.open and not rs.pending:
            self._end_round(rs, "complete", "")
        if rs.open and concurrent:
            self.groups[rs.round] = rs
            rs.timer = asyncio.get_running_loop().call_later(
                deadline_s, self._end_round, rs, "deadline", missed_deadline(deadline_s))
        elif rs.open:
            loop = asyncio.get_running_loop()
            if self._deadline_timer is not None:
                self._deadline_timer.cancel()
            self._deadline_timer = loop.call_later(
                deadline_s, self._end_round, rs, "deadline", missed_deadline(deadline_s)
            )
        self._notify()
        return rs

    def end_round(self, rs: RoundState, closed_by: str, reason: str) -> None:
        self._end_round(rs, closed_by, reason)

    def _drop(self, rs: RoundState, client: int, reason: str) -> None:
        if client not in rs.pending:
            return
        rs.pending.discard(client)
        rs.dropped.add(client)
        rs.out.put(Reply(Dropout(client, rs.round, reason, downlink_bytes=rs.downlink_bytes.get(client, 0)), rs.elapsed()))
        if rs.open and not rs.pending:
            self._end_round(rs, "complete", "")

    def _end_round(self, rs: RoundState, closed_by: str, reason: str) -> None:
        if not rs.open:
            return
        rs.open = False
        rs.closed_by = closed_by
        for cid in sorted(rs.pending):
            self._drop(rs, cid, reason)
        rs.task = None  # the payload is no longer needed: let it go
        rs.frames = {}
        rs.payloads = {}
        rs.closed.set()  # uploads in progress are refused now (see _next_chunk)
        rs.out.put(END)
        if rs.concurrent:
            self._group_closed(rs)
        if self._deadline_timer is not None and self.round is rs:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        self._notify()

    def finish(self, reason: str) -> None:
        """The run is over: tell every client (they stop), close any open round."""
        self.finished = True
        self.finished_reason = reason
        for rs in self._open_rounds():
            self._end_round(rs, "finished", "the run finished")
        self._notify()

    def not_yet_told(self) -> list[int]:
        """Connected clients that have not heard yet that the run finished."""
        return [cid for cid in self.available() if cid not in self.told_finished]

    def available(self) -> list[int]:
        """Registered clients with a valid token that heartbeated recently."""
        now = time.monotonic()
        active = self.tokens.active_ids()
        return sorted(cid for cid, cs in self.clients.items() if cid in active and now - cs.last_seen <= self.heartbeat_timeout_s)

    def snapshot(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [
            {**dataclasses.asdict(cs), "seen_s_ago": now - cs.last_seen, "session": None,
             "link": dataclasses.asdict(self.links[cs.client_id]) if cs.client_id in self.links else None}
            for cs in sorted(self.clients.values(), key=lambda c: c.client_id)
        ]

    async def _watch_liveness(self) -> None:
        """Drop selected clients of the open round that stopped heartbeating or lost their token."""
        tick = max(0.02, min(1.0, self.heartbeat_interval_s / 2))
        while True:
            await asyncio.sleep(tick)
            try:
                self._watch_secagg()
                for rs in self._open_rounds():
                    self._watch_round(rs)
            except Exception:  # noqa: BLE001 - the watcher must survive anything
                log.exception("liveness watcher")

    def _watch_round(self, rs: RoundState) -> None:
        """Drop the clients of `rs` that stopped heartbeating or lost their token."""
        now = time.monotonic()
        active = self.tokens.active_ids()
        for cid in sorted(rs.pending):
            if cid in rs.uploading:
                continue  # busy sending its update: alive
            cs = self.clients.get(cid)
            if cid not in active:
                self._drop(rs, cid, "its token was revoked")
                continue
            last = cs.last_seen if cs is not None else rs.t0
            if now - last > self.heartbeat_timeout_s:
                self._drop(rs, cid, f"no heartbeat for {now - last:.1f}s (timeout {self.heartbeat_timeout_s:.3g}s)")

    # -- overlapping task groups (FedBuff over gRPC) ---------------------------------------
    def open_group(self, task: Task, cohort: Iterable[int], deadline_s: float, payloads: dict[float, bytes] | None, out: Any) -> RoundState:
        """Publish `task` to `cohort` as a task group open beside the others (asynchronous
        FedBuff: each dispatch is a group keyed by its round, the dispatch number): it
        supersedes nothing, has its own deadline, and a client's update is admitted to the
        group it was dispatched in (`_group_of`).  Replies and dropouts go to `out`
        (anything with `put`), END when the group closes."""
        if task.round in self.groups:
            raise ValueError(f"task group {task.round} is already open")
        if self.round is not None and task.round <= self.round.round:
            raise ValueError(f"task group {task.round} is not newer than round {self.round.round}: "
                             "round numbers only go up (clients poll for rounds after their last)")
        return self.open_round(task, cohort, deadline_s, payloads, out=out, concurrent=True)

    def _group_closed(self, rs: RoundState) -> None:
        if rs.timer is not None:
            rs.timer.cancel()
            rs.timer = None
        if self.groups.get(rs.round) is rs:
            del self.groups[rs.round]

    def _open_rounds(self) -> list[RoundState]:
        """Every open round: the synchronous one and/or the open task groups."""
        out = [g for g in self.groups.values() if g.open]
        if self.round is not None and self.round.open and all(g is not self.round for g in out):
            out.append(self.round)
        return out

    def _task_round(self, client: int) -> RoundState | None:
        """The open round (or task group) in which `client` has a task to do, else the latest round."""
        return next((g for g in self.groups.values() if g.open and client in g.pending), self.round)

    def _group_of(self, client: int, round: int) -> RoundState | None:
        """The task group `round` that `client` was dispatched in, open or recently closed
        (its precise refusals: duplicate, dropped, after_deadline, round_closed); None if none."""
        g = self.groups.get(round)
        if g is not None and client in g.cohort:
            return g
        return next((h for h in reversed(self.history) if h.concurrent and h.round == round and client in h.cohort), None)

    # -- secure aggregation (transport/grpc/secagg.py) ----------------------------------------
    def _secagg_forget(self, cid: int) -> None:
        """A client that registers again lost its SecAgg keys: it drops out of the open SecAgg round."""
        sess = self.secagg
        if sess is None or sess.done or cid not in sess.clients:
            return
        sess.lost.add(cid)
        st = sess.stage
        if st is not None and cid in st.expected and cid not in st.received and not st.closed.is_set():
            st.gone.add(cid)
            if st.complete():
                st.closed.set()

    def _watch_secagg(self) -> None:
        """A client expected in the open SecAgg stage that stopped heartbeating (or lost its
        token) will not send: the stage stops waiting for it (it dropped at this stage)."""
        sess = self.secagg
        if sess is None or sess.done or sess.stage is None or sess.stage.closed.is_set():
            return
        st, now, active = sess.stage, time.monotonic(), self.tokens.active_ids()
        for cid in sorted(st.expected - set(st.received) - st.gone):
            cs = self.clients.get(cid)
            if cid not in active or cs is None or now - cs.last_seen > self.heartbeat_timeout_s:
                st.gone.add(cid)
                sess.lost.add(cid)
        if st.complete():
            st.closed.set()

    async def run_secagg(self, round: int, clients: Sequence[int], weights: Sequence[float], recipe, secure, dim: int,
                         stage_s: float):
        """Drive one round's secure aggregation: five stages, each closing when its expected
        clients sent (or dropped) or after `stage_s`; returns `RemoteSum`.  Raises SecAggError
        (too few survivors, an inconsistent reconstruction): the round fails."""
        from ...privacy.secagg import RemoteSum, SecAggServer

        n = len(clients)
        proto = SecAggServer(dim, secure.quantizer.modulus_bits, secure._threshold(n), secure.neighbors)
        sess = SecAggRound(round, tuple(int(c) for c in clients), {int(c): float(w) for c, w in zip(clients, weights)},
                           recipe, secure, dim, stage_s, proto)
        self.secagg = sess
        t0 = time.monotonic()
        try:
            got = await self._secagg_stage(sess, 0, set(sess.clients))
            directory = proto.advertise(list(got.values()))
            # Each client gets its slice: all keys under all pairs, its neighbours' under SecAgg+.
            self._secagg_answer(sess, {c: pb.SecAggReply(directory=directory_to_pb(proto.directory_for(c), recipe_to_pb(recipe, sess.weights[c], secure)))
                                       for c in got})
            got = await self._secagg_stage(sess, 1, set(directory.keys))
            forwarded = proto.collect_shares(list(got.values()))
            self._secagg_answer(sess, {v: pb.SecAggReply(forwarded=forwarded_to_pb(f)) for v, f in forwarded.items()})
            got = await self._secagg_stage(sess, 2, set(proto.participants))
            request = proto.collect_masked(list(got.values()))
            # SecAgg+: each survivor is told U3 among its neighbourhood and gets the signatures its
            # neighbours addressed to it; all pairs: one answer (all of U3, all of U4's signatures) for everyone.
            sparse = directory.degree is not None
            whole = None if sparse else survivors_to_pb(request)
            views = {u: survivors_to_pb(proto.request_for(u)) if sparse else whole for u in request.survivors}
            self._secagg_answer(sess, {u: pb.SecAggReply(consistency_request=view) for u, view in views.items()})
            got = await self._secagg_stage(sess, 3, set(request.survivors))
            signed = proto.collect_signatures(list(got.values()), verified=True)  # each checked as it arrived (_secagg_parse)

            def unmask_request(u: int) -> pb.SecAggUnmaskRequest:
                sigs = sorted(proto.signatures_for(u).items())
                return pb.SecAggUnmaskRequest(survivors=views[u], signatures=[pb.SecAggBlob(client_id=w, data=sig) for w, sig in sigs])

            one = None if sparse else unmask_request(min(signed))
            self._secagg_answer(sess, {u: pb.SecAggReply(unmask_request=unmask_request(u) if sparse else one) for u in signed})
            got = await self._secagg_stage(sess, 4, set(signed))
            total = proto.unmask(list(got.values()))
            self._secagg_answer(sess, {u: pb.SecAggReply(done=pb.SecAggDone(survivors=len(request.survivors))) for u in got})
            m = sess.measurements()
            m.update(secagg_survivors=len(request.survivors), secagg_dropped=sorted(set(sess.clients) - set(request.survivors)),
                     secagg_threshold=proto.threshold, secagg_server_seconds=round_(time.monotonic() - t0))
            secagg_dump("sum", round, 0, json.dumps({"sum": [int(v) for v in total], "survivors": list(request.survivors),
                                                     "modulus_bits": secure.quantizer.modulus_bits}).encode())
            return RemoteSum(total, tuple(request.survivors), tuple(sorted(set(sess.clients) - set(request.survivors))), m,
                             {c: (sess.uplink.get(c, 0), sess.downlink.get(c, 0)) for c in sess.clients})
        except Exception as exc:
            sess.failed = str(exc) or type(exc).__name__
            raise
        finally:
            sess.done = True
            if sess.stage is not None:
                sess.stage.closed.set()
                sess.stage.answered.set()
            proto.inbox.clear()  # the round's messages and masked rows are not needed any more
            proto.masked = {}
            self._notify()

    async def _secagg_stage(self, sess: SecAggRound, index: int, expected: set[int]) -> dict[int, Any]:
        """Open stage `index` for `expected` clients; return what arrived when it closes."""
        st = SecAggStage(SECAGG_STAGES[index], set(expected), time.monotonic() + sess.stage_s)
        st.gone |= expected & sess.lost
        sess.stage, sess.index = st, index
        self._notify()  # advertisements waiting for this round's SecAgg to start
        if not st.complete():
            try:
                await asyncio.wait_for(st.closed.wait(), sess.stage_s)
            except TimeoutError:
                pass
        st.closed.set()
        sess.stage_seconds[st.name] = time.monotonic() - st.started
        return dict(st.received)

    @staticmethod
    def _secagg_answer(sess: SecAggRound, replies: dict[int, Any]) -> None:
        assert sess.stage is not None
        sess.stage.replies = replies
        sess.stage.answered.set()

    async def _secagg_session(self, r: int, cid: int, kind: str) -> SecAggRound:
        """The SecAgg round a message for round `r` belongs to (an advertisement may wait for
        it to start: the server starts it once the round's updates are collected)."""
        give_up = time.monotonic() + (self.round.deadline_s if self.round is not None else 0.0) + self.limits.max_wait_s
        while True:
            sess = self.secagg
            if sess is not None and sess.round == r:
                if sess.done:
                    raise Refusal("replay", f"the secure aggregation of round {r} is over")
                return sess
            latest = self.round.round if self.round is not None else 0
            if r > latest:
                raise Refusal("wrong_round", f"there is no round {r} (latest round: {latest or 'none yet'})")
            if r < latest or (sess is not None and sess.round > r):
                raise Refusal("replay", f"round {r} is over (latest round: {latest}); SecAgg messages are accepted only for the current round")
            if kind != SECAGG_STAGES[0]:
                raise Refusal("wrong_round", f"no secure aggregation is running for round {r}: a client starts with stage {SECAGG_STAGES[0]!r}")
            if self.round is None or cid not in self.round.replied:
                raise Refusal("not_selected", f"client {cid} sent no accepted update in round {r}: it takes no part in its secure aggregation")
            if self.finished:
                raise Refusal("round_closed", "the run finished")
            left = give_up - time.monotonic()
            if left <= 0:
                raise Refusal("round_closed", f"no secure aggregation started for round {r} (the round failed or stopped before aggregating)")
            changed = self._changed
            assert changed is not None
            try:
                await asyncio.wait_for(changed.wait(), left)
            except TimeoutError:
                pass

    def _secagg_parse(self, sess: SecAggRound, cid: int, kind: str, body: Any) -> Any:
        p = sess.protocol
        if kind == "advertise":
            return advertise_from_pb(cid, body)
        if kind == "share_keys":
            return share_keys_from_pb(cid, body, p.directory.neighbors[cid])
        if kind == "masked_input":
            return masked_from_pb(cid, body, sess.dim, p.modulus_bits)
        if kind == "consistency":
            msg = signature_from_pb(cid, body, None if p.directory.degree is None else p.surviving_neighbors(cid))
            try:
                p.check_signature(msg)  # a bad signature drops its sender here, not the round
            except SecAggError as exc:
                raise Refusal("malformed", f"SecAggSignature from client {cid}: {exc}") from None
            return msg
        view = p.request_for(cid)  # what this client was told: its shares can only be for these
        return unmask_from_pb(cid, body, view.survivors, view.dropped)

    async def SecAggStep(self, request: pb.SecAggRequest, context: grpc.aio.ServicerContext, check: TokenCheck) -> pb.SecAggReply:
        """One client's message of the open SecAgg stage; answered when the stage closes."""
        cs = self._session(check, request.client_id, request.session)
        cid, r = cs.client_id, int(request.round)
        if not self.requirements.secagg:
            raise Refusal("malformed", "this run does not use secure aggregation (privacy.secure_aggregation = false)")
        kind = request.WhichOneof("body")
        if kind is None:
            raise Refusal("malformed", "SecAggRequest without a body (advertise, share_keys, masked_input, consistency or unmask)")
        secagg_dump(f"secagg-{kind}", r, cid, request.SerializeToString())  # testing aid (FLEETLEARN_SECAGG_DUMP_DIR)
        sess = await self._secagg_session(r, cid, kind)
        st, index = sess.stage, SECAGG_STAGES.index(kind)
        assert st is not None
        if index < sess.index:
            raise Refusal("replay", f"SecAgg stage {kind!r} of round {r} is over (open stage: {st.name!r})")
        if index > sess.index:
            raise Refusal("malformed", f"SecAgg stage {kind!r} sent while stage {st.name!r} of round {r} is open")
        if cid in st.received:
            raise Refusal("duplicate", f"client {cid} already sent its {kind!r} message for round {r}")
        if cid not in st.expected or cid in st.gone:
            raise Refusal("not_selected", f"client {cid} is not expected in SecAgg stage {kind!r} of round {r} (not selected, or dropped earlier)")
        if st.closed.is_set():
            raise Refusal("after_deadline", f"SecAgg stage {kind!r} of round {r} closed (its deadline is {sess.stage_s:.3g}s)")
        try:
            msg = self._secagg_parse(sess, cid, kind, getattr(request, kind))
        except Refusal:
            st.gone.add(cid)  # a client that sent garbage takes no further part: it dropped at this stage
            sess.lost.add(cid)
            if st.complete():
                st.closed.set()
            raise
        st.received[cid] = msg
        sess.count(cid, up=request.ByteSize(), stage=kind)
        if st.complete():
            st.closed.set()
        try:
            await asyncio.wait_for(st.answered.wait(), max(st.deadline - time.monotonic(), 0.0) + sess.stage_s + 30.0)
        except asyncio.CancelledError:
            sess.lost.add(cid)  # its call was cut (the client went away): the next stage does not wait for it
            nxt = sess.stage
            if nxt is not None and nxt is not st and cid in nxt.expected:
                nxt.gone.add(cid)
                if nxt.complete():
                    nxt.closed.set()
            raise
        except TimeoutError:
            raise Refusal("round_closed", f"secure aggregation of round {r} did not answer stage {kind!r} in time") from None
        if sess.failed:
            raise Refusal("round_closed", f"secure aggregation of round {r} failed: {sess.failed}")
        reply = st.replies.get(cid)
        if reply is None:
            raise Refusal("round_closed", f"client {cid} takes no part in the next SecAgg stage of round {r} (counted as dropped)")
        sess.count(cid, down=reply.ByteSize(), stage=kind)
        return reply


def round_(x: float) -> float:
    return round(x, 4)
