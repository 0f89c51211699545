"""The gRPC client: register, heartbeat, pull a task, train, push the update; repeat.

It trains with the same code as the simulation and the Ray workers: one
`fleetlearn.client.Device` runs the task (a cohort of one) into an Update, reading
every client-side feature from the task's typed spec; this module only moves
messages (pull, push, heartbeats, retries).

Failures are routine on a fleet, so the client treats them as such:
- the server is down or restarting (UNAVAILABLE, DEADLINE_EXCEEDED): retry with
  exponential backoff and jitter; the gRPC channel's own reconnect backoff is
  bounded the same way;
- the server forgot the client (NOT_FOUND, e.g. after `kill -9` and `--resume`):
  register again with the same token (same client id) and pull the next task,
  whatever model version it carries;
- an update refused (FAILED_PRECONDITION: late, duplicate, stale version): drop
  it, count it, pull the next task;
- the token is bad or revoked, or the client is incompatible with the run
  (UNAUTHENTICATED, PERMISSION_DENIED, FAILED_PRECONDITION at registration), or
  the server's certificate does not verify (not valid for the name dialled, not
  signed by the given CA, or the server does not speak TLS): stop with
  `ClientRefused` naming the problem, since retrying cannot help;
- the server says the run finished: stop.

`run_client` is the blocking entry point (one client per call, e.g. per
process); `FleetClient.run` is the coroutine, so one process can run many
clients on one event loop (benchmarks/grpc_load.py runs 1000).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import grpc

from ...client import ClientStateStore, Device
from ...client.probe import PROBE_FEATURE
from ...compression import capabilities, parse_chain
from ...learners.base import ClientData, Learner
from ...messages import Dropout, Task
from ...privacy.secagg import SecAggError
from ...task_spec import AdaptiveEntry, TaskSpec, TaskSpecError
from ..simulation import client_seed
from . import fleetlearn_pb2 as pb
from . import fleetlearn_pb2_grpc as pb_grpc
from .certs import ClientTls
from .chunks import DEFAULT_CHUNK_BYTES, PayloadAssembler, iter_chunks
from .refusals import Refusal
from .server import RETRY_AFTER_HEADER, TOKEN_HEADER, runtime_version

log = logging.getLogger("fleetlearn.transport.grpc.client")

_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # e.g. the server's concurrent-RPC limit
}


class ClientRefused(RuntimeError):
    """The server refused this client for good (bad or revoked token, incompatible client)."""

    def __init__(self, code: grpc.StatusCode, detail: str):
        super().__init__(f"{code.name}: {detail}")
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter: attempt n waits ``min(max_s, initial_s * multiplier**n)``
    scaled by a random factor in ``[1 - jitter, 1]`` (so a fleet does not retry in lockstep)."""

    initial_s: float = 0.5
    max_s: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def delay(self, attempt: int, rng: random.Random) -> float:
        base = min(self.max_s, self.initial_s * self.multiplier ** max(0, attempt))
        return base * (1.0 - self.jitter * rng.random())


@dataclass
class ClientReport:
    """What a client did, returned when it stops."""

    client_id: int | None = None
    rounds: list[int] = field(default_factory=list)  # rounds whose update the server accepted
    refused: Counter = field(default_factory=Counter)  # refused updates by status code name
    skipped_late: int = 0  # updates not sent because the deadline had passed
    skipped_bad_task: int = 0  # tasks this client could not use (undecodable payload, wrong sizes)
    registrations: int = 0
    retries: int = 0
    stopped: str = ""  # finished | max_rounds | gave_up | stopped | refused: ...
    model_width: float = 0.0  # HeteroFL: the width the server assigned at registration (0: no HeteroFL)
    task_bytes: list[int] = field(default_factory=list)  # bytes of each task payload received (model + control)
    secagg: list = field(default_factory=list)  # per secure-aggregation round: its cost (transport/grpc/secagg.take_part)


def _memory_mb() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


def _retry_after(err: grpc.aio.AioRpcError) -> float | None:
    """Seconds the server asked us to wait before polling again, if it did."""
    for key, value in err.trailing_metadata() or ():
        if key == RETRY_AFTER_HEADER:
            try:
                return max(0.0, float(value) / 1000.0)
            except (TypeError, ValueError):
                return None
    return None


def _split_target(target: str) -> tuple[str, int] | None:
    """(host, port) of a "HOST:PORT" / "[V6]:PORT" / "dns:///HOST:PORT" target, None otherwise."""
    target = target.removeprefix("dns:///").removeprefix("ipv4:").removeprefix("ipv6:")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _certificate_names(target: str, timeout_s: float = 5.0) -> list[str]:
    """The names (SAN) in the certificate the server at `target` presents, fetched without
    verifying it; [] when that fails (best effort, for error messages only)."""
    import socket
    import ssl

    from cryptography import x509

    hp = _split_target(target)
    if hp is None:
        return []
    try:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with socket.create_connection(hp, timeout=timeout_s) as sock, ctx.wrap_socket(sock, server_hostname=hp[0]) as tls:
            der = tls.getpeercert(binary_form=True)
        cert = x509.load_der_x509_certificate(der)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return [str(v) for v in san.get_values_for_type(x509.IPAddress)] + list(san.get_values_for_type(x509.DNSName))
    except Exception:  # noqa: BLE001 - only used to say more in an error message
        return []


def tls_problem(details: str, target: str, tls: ClientTls | None) -> str | None:
    """A sentence naming the certificate problem behind a connection failure (gRPC reports
    it as UNAVAILABLE, like an unreachable server), or None if it is not one."""
    if tls is None:
        return None
    hp = _split_target(target)
    name = tls.server_name or (hp[0] if hp else target)
    if "Hostname Verification" in details or "No match found for server name" in details or "Peer name" in details:
        names = _certificate_names(target)
        held = f" (it names {', '.join(names)})" if names else ""
        return (f"TLS: the server's certificate is not valid for {name!r}{held}: make the server's certificate for the "
                f"name clients dial (fleetlearn certs --host {name}), or pass --tls-server-name with a name it holds")
    if "CERTIFICATE_VERIFY_FAILED" in details or "certificate verify failed" in details:
        why = details.rsplit("CERTIFICATE_VERIFY_FAILED", 1)[-1].strip(": ").removesuffix(": OK")
        ca = f"the CA in {tls.ca}" if tls.ca else "the system's CAs"
        return (f"TLS: the server's certificate does not verify against {ca} ({why or 'verification failed'}): "
                "pass the ca.pem from the `fleetlearn certs` folder whose server.pem the server uses")
    if "WRONG_VERSION_NUMBER" in details:
        return f"TLS: the server at {target} does not answer in TLS (is it running without --certs?)"
    return None


class _Stop(Exception):
    def __init__(self, why: str):
        self.why = why


class _BadStream(Exception):
    """The server sent a task stream we cannot use; retried like a connection fault."""


# Protocol features this runtime supports (Capabilities.features): "scaffold" = it reads
# SCAFFOLD's control variate after the model payload and keeps its own c_i; "heterofl" = it
# reads TaskMeta.model_width and trains that width's sub-model (the payload is the sub-model);
# "secagg" = it masks its own update in SecAggStep (secure aggregation, transport/grpc/secagg.py).
FEATURES = ("scaffold", "heterofl", "secagg")
MAX_RECEIVE_BYTES = 64 << 20  # the largest single message the client accepts (servers send 1 MiB chunks)


class FleetClient:
    """One client of a fleetlearn server (a coroutine; see `run_client` for the blocking call).

    `learner` and `data` are what the simulation would use for this client.
    `device` is the announced device profile (compute_sps, uplink_mbps, downlink_mbps).
    `uplink_limit_mbps` caps the rate at which updates are sent (paced chunk by chunk), as
    a device on a metered or shared link would; the server measures the rate it receives
    and picks adaptive-compression rungs from it.
    `memory_mb` is the memory the device declares for training (default: the machine's
    available memory); a HeteroFL run assigns the client's model width from it.  The
    learner's `model_widths` (HeteroFL: the run's widths) are announced as trainable.
    """

    def __init__(
        self,
        server: str,
        token: str,
        learner: Learner,
        data: ClientData,
        *,
        tls: ClientTls | None = None,
        name: str = "",
        max_rounds: int | None = None,
        backoff: Backoff = Backoff(),
        give_up_after_s: float | None = None,
        device: Mapping[str, float] | None = None,
        poll_s: float = 30.0,
        call_timeout_s: float = 30.0,
        max_task_bytes: int = 1 << 30,
        max_push_attempts: int = 5,
        train_in_thread: bool = True,
        channel_options: list[tuple[str, Any]] | None = None,
        seed: int | None = None,
        uplink_limit_mbps: float | None = None,
        personalization=None,
        probe: bool = False,
        uplink_wrap=None,
        memory_mb: int | None = None,
        attack=None,
        before_train: Callable[[Task], None] | None = None,
    ):
        # A red-team client (`fleetlearn client --attack`): fleetlearn.attacks.DeviceAttack, run by the device.
        self.attack = attack
        # Called with each task before its local training, on the training thread (a device
        # that trains only when idle or charging waits here; tests use it to hold a client).
        self.before_train = before_train
        if memory_mb is not None and (isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or memory_mb < 0):
            raise ValueError(f"memory_mb must be a whole number of MiB >= 0 (or None: the machine's available memory), got {memory_mb!r}")
        self.memory_mb = memory_mb
        if uplink_limit_mbps is not None and not (math.isfinite(uplink_limit_mbps) and uplink_limit_mbps > 0):
            raise ValueError(f"uplink_limit_mbps must be a finite number > 0 (or None for no limit), got {uplink_limit_mbps!r}")
        self.uplink_limit_mbps = uplink_limit_mbps
        # fleetlearn.client.personalization part (the run's `[personalization]`) or None: the
        # personal state (FedPer heads, Ditto models) stays on this device.
        self.personalization = personalization
        # A probe client (fleetlearn.client.probe) announces the "probe" feature; its `data` is
        # then a function (task, client id) -> ClientData, and `uplink_wrap` (the test hook's
        # broken codec, or None) wraps the run's uplink chain.
        self.probe = bool(probe)
        self.uplink_wrap = uplink_wrap
        # One address, or several ("A,B" or a list): the servers of one run, a leader and its
        # standbys (`fleetlearn server --standby`).  An unreachable one fails over to the next.
        servers = [a.strip() for a in (server.split(",") if isinstance(server, str) else server)]
        if not servers or any(not a or len(a) > 300 for a in servers):
            raise ValueError(f"server address list {server!r}: give HOST:PORT, or several separated by commas")
        self.servers = servers
        self._server_index = 0
        self.server = servers[0]
        self.learner = learner
        self.data = data
        self.tls = tls
        self.name = name
        self.max_rounds = max_rounds
        self.backoff = backoff
        self.give_up_after_s = give_up_after_s
        self.device = dict(device or {})
        self.poll_s = poll_s
        self.call_timeout_s = call_timeout_s
        self.max_task_bytes = max_task_bytes
        self.max_push_attempts = max_push_attempts
        self.train_in_thread = train_in_thread
        self.channel_options = list(channel_options or [])
        self.report = ClientReport()
        self._metadata = ((TOKEN_HEADER, f"Bearer {token}"),)
        self._rng = random.Random(seed)
        self._client_id: int | None = None
        self._session: str | None = None
        self._heartbeat_s = 5.0
        self._chunk_bytes = DEFAULT_CHUNK_BYTES
        self._device: Device | None = None  # the client device, rebuilt when the run's chains change
        self._device_key: tuple[str, str, float] | None = None
        self._states = ClientStateStore()  # error-feedback residuals etc., kept across rounds
        self._after_round = 0
        self._finished = False
        self._fatal: ClientRefused | None = None
        self._stop_requested = False
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._main: asyncio.Task | None = None
        self._pushing = False

    # -- control -----------------------------------------------------------------------
    def request_stop(self) -> None:
        """Ask the client to stop now, even mid-poll or mid-training (thread-safe)."""
        self._stop_requested = True
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._interrupt)

    def _interrupt(self) -> None:
        """Cancel whatever the main loop awaits (a long poll, a backoff, training):
        used only when the client is about to stop anyway.  An update being pushed is let
        finish (at most its call timeout): the loop stops right after it, and the report
        then counts a round the server did accept."""
        if self._pushing:
            if self._wake is not None:
                self._wake.set()  # ... but a retry's backoff ends now
            return
        if self._main is not None and not self._main.done():
            self._main.cancel()

    # -- channel -------------------------------------------------------------------------
    def _channel(self) -> grpc.aio.Channel:
        b = self.backoff
        options = [
            ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
            ("grpc.max_send_message_length", MAX_RECEIVE_BYTES),
            # Reconnect as eagerly as our own backoff allows (gRPC's default max is 120 s).
            ("grpc.initial_reconnect_backoff_ms", int(b.initial_s * 1000)),
            ("grpc.min_reconnect_backoff_ms", int(b.initial_s * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(b.max_s * 1000)),
            ("grpc.enable_retries", 0),
            ("grpc.keepalive_time_ms", 60_000),
            *self.channel_options,
        ]
        if self.tls is not None:
            return grpc.aio.secure_channel(self.server, self.tls.credentials(), options=options + self.tls.channel_options())
        return grpc.aio.insecure_channel(self.server, options=options)

    # -- the loop --------------------------------------------------------------------------
    async def run(self) -> ClientReport:
        """Take part in the run until it finishes, `max_rounds` are done, or a fatal refusal."""
        self._loop = asyncio.get_running_loop()
        self._main = asyncio.current_task()
        self._wake = asyncio.Event()
        channel = self._channel()
        stub = pb_grpc.FleetLearnStub(channel)
        heartbeat: asyncio.Task | None = None

        async def fail_over() -> None:  # the next address of the list, on a new channel
            nonlocal channel, stub, heartbeat
            if heartbeat is not None:
                heartbeat.cancel()
                heartbeat = None
            await channel.close(grace=None)
            self._server_index = (self._server_index + 1) % len(self.servers)
            self.server = self.servers[self._server_index]
            self._session = None  # another server: register there (the token store is shared)
            channel = self._channel()
            stub = pb_grpc.FleetLearnStub(channel)
            log.info("client %s: failing over to %s", self._client_id, self.server)

        failures = 0
        last_ok = time.monotonic()
        try:
            while True:
                try:
                    self._check_stop()
                    if self._session is None:
                        await self._register(stub)
                    if heartbeat is None or heartbeat.done():
                        heartbeat = asyncio.create_task(self._heartbeats(stub))
                    task = await self._pull(stub)
                    failures, last_ok = 0, time.monotonic()
                    if task is None:
                        continue
                    await self._train_and_push(stub, task)
                    failures, last_ok = 0, time.monotonic()
                    if self.max_rounds is not None and len(self.report.rounds) >= self.max_rounds:
                        raise _Stop("max_rounds")
                except (grpc.aio.AioRpcError, _BadStream) as exc:
                    if isinstance(exc, _BadStream):
                        code, details = grpc.StatusCode.UNKNOWN, str(exc)
                    else:
                        code, details = exc.code(), exc.details() or ""
                    if code == grpc.StatusCode.NOT_FOUND:
                        log.info("client %s: the server does not know this session (%s); registering again", self._client_id, details)
                        self._session = None
                        if failures:  # forgotten again right after registering: do not spin
                            await self._sleep(self.backoff.delay(failures, self._rng))
                        failures += 1
                        continue
                    if code not in _RETRYABLE:  # UNAUTHENTICATED, PERMISSION_DENIED, ...: retrying cannot help
                        raise ClientRefused(code, details) from None
                    if code == grpc.StatusCode.UNAVAILABLE and (problem := tls_problem(details, self.server, self.tls)):
                        raise ClientRefused(code, problem) from None  # a certificate does not fix itself
                    if self.give_up_after_s is not None and time.monotonic() - last_ok > self.give_up_after_s:
                        raise _Stop(f"gave_up: no answer from {','.join(self.servers)} for {self.give_up_after_s:.0f}s ({code.name}: {details})")
                    hint = _retry_after(exc) if code == grpc.StatusCode.UNAVAILABLE and isinstance(exc, grpc.aio.AioRpcError) else None
                    if hint is not None:  # a live server asked us back (a standby waiting to lead): the backoff starts over
                        delay, failures = hint, 0
                    else:  # the backoff grows once per pass over the address list, not per address
                        delay = self.backoff.delay(failures // len(self.servers), self._rng)
                        failures += 1
                    if len(self.servers) > 1 and code == grpc.StatusCode.UNAVAILABLE:
                        await fail_over()
                    self.report.retries += 1
                    log.debug("client %s: %s (%s); retrying in %.2fs", self._client_id, code.name, details, delay)
                    await self._sleep(delay)
        except _Stop as s:
            self.report.stopped = s.why
        except ClientRefused as exc:
            self.report.stopped = f"refused: {exc}"
            raise
        except asyncio.CancelledError:
            if not (self._stop_requested or self._fatal or self._finished):
                raise  # cancelled from outside: not ours to swallow
            self._main.uncancel()  # type: ignore[union-attr]
            if self._fatal is not None:
                self.report.stopped = f"refused: {self._fatal}"
                raise self._fatal from None
            self.report.stopped = "finished" if self._finished else "stopped"
        finally:
            if heartbeat is not None:
                heartbeat.cancel()
                try:
                    await heartbeat
                except (asyncio.CancelledError, Exception):  # noqa: BLE001
                    pass
            await channel.close(grace=None)
        return self.report

    def _check_stop(self) -> None:
        if self._fatal is not None:
            raise self._fatal
        if self._finished:
            raise _Stop("finished")
        if self._stop_requested:
            raise _Stop("stopped")

    async def _sleep(self, seconds: float) -> None:
        """Sleep, waking early if a stop is requested or the heartbeat saw something."""
        assert self._wake is not None
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except asyncio.TimeoutError:
            pass
        self._check_stop()

    # -- calls -------------------------------------------------------------------------------
    def _register_request(self) -> pb.RegisterRequest:
        """What this client announces when it registers (a regional aggregator adds its region)."""
        return pb.RegisterRequest(
            client_name=self.name,
            runtime_version=runtime_version(),
            capabilities=pb.Capabilities(
                codecs=capabilities(), model_widths=list(getattr(self.learner, "model_widths", (1.0,))),
                memory_mb=self.memory_mb if self.memory_mb is not None else _memory_mb(), model_digest=self.learner.spec.digest(),
                features=list(FEATURES) + ([PROBE_FEATURE] if self.probe else []),
            ),
            device=pb.DeviceProfile(
                compute_sps=float(self.device.get("compute_sps", 0.0)),
                uplink_mbps=float(self.device.get("uplink_mbps", 0.0)),
                downlink_mbps=float(self.device.get("downlink_mbps", 0.0)),
            ),
        )

    async def _register(self, stub: pb_grpc.FleetLearnStub) -> None:
        request = self._register_request()
        try:
            reply = await stub.Register(request, metadata=self._metadata, timeout=self.call_timeout_s)
        except grpc.aio.AioRpcError as err:
            if err.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT):
                raise ClientRefused(err.code(), err.details() or "") from None
            raise
        self._client_id = int(reply.client_id)
        self._session = reply.session
        self._heartbeat_s = reply.heartbeat_interval_s or 5.0
        self._chunk_bytes = int(reply.chunk_bytes) or DEFAULT_CHUNK_BYTES
        self._after_round = 0  # a restarted server may re-run the round we last saw
        self.report.client_id = self._client_id
        self.report.model_width = float(reply.model_width)
        self.report.registrations += 1
        if reply.run_finished:
            self._finished = True
        log.info("client %d registered with %s", self._client_id, self.server)

    async def _heartbeats(self, stub: pb_grpc.FleetLearnStub) -> None:
        """Heartbeat every interval, also while training (in another thread), until cancelled."""
        assert self._wake is not None
        while True:
            await asyncio.sleep(self._heartbeat_s)
            if self._session is None or self._client_id is None:
                continue
            try:
                reply = await stub.Heartbeat(
                    pb.HeartbeatRequest(client_id=self._client_id, session=self._session),
                    metadata=self._metadata, timeout=max(1.0, self._heartbeat_s * 2),
                )
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.NOT_FOUND:
                    self._session = None
                    self._wake.set()
                elif err.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    self._fatal = ClientRefused(err.code(), err.details() or "")
                    self._interrupt()
                    return
                continue  # the main loop deals with connection trouble
            if reply.run_finished:
                self._finished = True
                self._interrupt()
                return

    async def _pull(self, stub: pb_grpc.FleetLearnStub) -> tuple[Task, float, str, float, float | None] | None:
        """The next task (with its local deadline, uplink chain, HeteroFL model width (0 for the
        full model) and, under secure aggregation, the deadline of each SecAgg stage), or None
        after an empty long poll."""
        if self._client_id is None or self._session is None:
            return None  # the heartbeat saw the server forget us: the loop registers again
        call = stub.PullTask(
            pb.PullTaskRequest(client_id=self._client_id, session=self._session, wait_s=self.poll_s, after_round=self._after_round),
            metadata=self._metadata,
            timeout=self.poll_s + self.call_timeout_s,
        )
        meta = None
        assembler = None
        received_at = 0.0
        try:
            async for chunk in call:
                kind = chunk.WhichOneof("kind")
                if kind == "finished":
                    self._finished = True
                    raise _Stop("finished")
                if kind == "meta" and meta is None:
                    meta = chunk.meta
                    received_at = time.monotonic()
                    assembler = PayloadAssembler(meta.payload_bytes + meta.control_bytes, self.max_task_bytes, MAX_RECEIVE_BYTES, "task payload")
                elif kind == "data" and assembler is not None:
                    assembler.add(chunk.data.offset, chunk.data.data)
                else:
                    raise Refusal("malformed", f"unexpected {kind} message in the task stream")
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.UNAVAILABLE and _retry_after(err) is not None:
                await self._sleep(_retry_after(err) or 0.0)
                return None
            raise
        except Refusal as r:  # the server sent something we cannot use: treat as a transient fault
            raise _BadStream(f"bad task stream: {r.detail}") from None
        if meta is None or assembler is None:
            return None
        body = assembler.finish()
        self.report.task_bytes.append(len(body))
        split = int(meta.payload_bytes)  # the model, then SCAFFOLD's control variate (control_bytes)
        try:
            spec = TaskSpec.from_json(meta.config_json)
        except TaskSpecError as exc:  # a task this client cannot use: skip its round, keep going
            self._after_round = int(meta.round)
            self.report.skipped_bad_task += 1
            log.warning("client %d: round %d task unusable (%s); skipped", self._client_id, int(meta.round), exc)
            return None
        task = Task(
            round=int(meta.round), version=int(meta.version), payload=body[:split], codec=meta.codec,
            spec=spec, deadline_s=meta.deadline_s or None, control=body[split:],
        )
        local_deadline = received_at + meta.remaining_s if meta.remaining_s > 0 else float("inf")
        secagg_s = float(meta.secagg_stage_s) if meta.secagg and math.isfinite(meta.secagg_stage_s) and meta.secagg_stage_s > 0 else None
        if meta.secagg and secagg_s is None:
            secagg_s = self.poll_s
        return task, local_deadline, meta.uplink_codec or "none", float(meta.model_width), secagg_s

    def _learner_for(self, width: float) -> Learner:
        """The learner a task trains: the model, or (HeteroFL) its width-`width` sub-model."""
        if not width:
            return self.learner
        at_width = getattr(self.learner, "at_width", None)
        if at_width is None or not math.isfinite(width):
            raise ValueError(f"the task names model width {width!r}, but this client's model has no widths (model.widths)")
        return at_width(width)

    def _device_for(self, downlink: str, uplink: str, adaptive: bool = False, width: float = 0.0) -> Device:
        key = (downlink, uplink, width)
        if self._device is None or self._device_key != key:
            if self._device_key is not None and ((self._device_key[1] != uplink and not adaptive) or self._device_key[2] != width):
                # Residuals of another run's chain (or of another width's sub-model) do not apply; the
                # rungs of one adaptive ladder share them (as in the simulation: an EF residual waits for its rung).
                self._states = ClientStateStore()
            # The device's dim is the model's (HeteroFL: the sub-model's): a task payload for another dimension
            # is refused before anything of its size is allocated (a zstd body's bound is this model's, not the header's).
            chain = parse_chain(uplink)
            if self.uplink_wrap is not None:
                chain = self.uplink_wrap(chain)
            device = Device(self._learner_for(width), chain, parse_chain(downlink), self._states,
                            personalization=self.personalization, attack=self.attack)
            if self._device is not None:
                device.personal_states = self._device.personal_states  # a new chain keeps the personal state
            self._device = device
            self._device_key = key
        return self._device

    def _step_budget(self, task: Task, local_deadline: float, batch_size: int) -> int | None:
        """Partial work (task config `partial_work`): the local steps that fit before the
        deadline, from the announced device profile, as the simulation computes them;
        None for no cut."""
        sps = float(self.device.get("compute_sps", 0.0))
        if not task.spec.partial_work or not math.isfinite(local_deadline) or sps <= 0:
            return None
        mbps = float(self.device.get("uplink_mbps", 0.0))
        upload_s = task.nbytes * 8.0 / (mbps * 1e6) if mbps > 0 else 0.0  # the update is at most about the model's size
        budget = local_deadline - time.monotonic() - upload_s
        return max(0, math.floor(max(budget, 0.0) * sps / max(batch_size, 1)))

    async def _train_and_push(self, stub: pb_grpc.FleetLearnStub, pulled: tuple[Task, float, str, float, float | None]) -> None:
        task, local_deadline, uplink, width, secagg_s = pulled
        assert self._client_id is not None
        cid = self._client_id
        used: list[Device] = []  # the device train() ran on (its width's): secure aggregation takes the held update from it

        def train():
            if self.before_train is not None:
                self.before_train(task)
            device = self._device_for(task.codec, uplink, adaptive=task.spec.get(AdaptiveEntry) is not None, width=width)
            used.append(device)
            # A probe trains in full (the server predicts a full local run).
            steps = None if self.probe else self._step_budget(task, local_deadline, task.spec.fit.batch_size)
            if steps == 0:
                return None
            seed = client_seed(task.spec.seed, task.round, cid)
            data = self.data(task, cid) if callable(self.data) else self.data  # a probe's data is drawn per round
            # Secure aggregation: the update stays on the device until the SecAgg stages mask it.
            (update,) = device.run(task, [cid], [data], [seed], [steps], secure=secagg_s is not None)
            return update

        try:
            update = await asyncio.to_thread(train) if self.train_in_thread else train()
        except ValueError as exc:  # a task this client cannot use: skip its round, keep going
            self._after_round = task.round
            self.report.skipped_bad_task += 1
            log.warning("client %d: round %d task unusable (%s); skipped", cid, task.round, exc)
            return
        self._after_round = task.round
        held = used[0].take_held(cid) if used else None  # secure aggregation: the update kept on the device (masked after the push)
        if isinstance(update, Dropout):  # e.g. local training diverged: nothing to send this round
            self.report.skipped_bad_task += 1
            log.warning("client %d: round %d: %s; update not sent", cid, task.round, update.reason)
            return
        if update is None or time.monotonic() > local_deadline:
            self.report.skipped_late += 1
            log.info("client %d: round %d deadline passed during training; update not sent", cid, task.round)
            return
        m = update.metrics
        meta = pb.UpdateMeta(
            client_id=cid, session=self._session or "", round=update.round, base_version=update.base_version,
            codec=update.codec, num_examples=update.num_examples, payload_bytes=len(update.payload),
            downlink_bytes=update.downlink_bytes,
            metrics=pb.ClientMetrics(
                loss_before=m.loss_before, loss_after=m.loss_after, accuracy=m.accuracy,
                compute_seconds=m.compute_seconds, steps=m.steps, samples=m.samples,
                label_counts=list(m.label_counts or ()), oversampled=m.oversampled,
                **{k: v for k in ("personal_accuracy", "global_accuracy") if not math.isnan(v := getattr(m, k))},
            ),
        )
        if not await self._push_update(stub, meta, update.payload, local_deadline):
            return
        if secagg_s is not None and held is not None:
            await self._secure_aggregate(stub, task.round, held, secagg_s)
        self.report.rounds.append(task.round)

    async def _push_update(self, stub: pb_grpc.FleetLearnStub, meta: pb.UpdateMeta, payload: bytes, local_deadline: float) -> bool:
        """Send one update (`meta`, then `payload` in chunks, paced by `uplink_limit_mbps`);
        a transient fault is retried until the round's deadline.  False when the server
        refused it (counted in the report)."""
        cid, round = int(meta.client_id), int(meta.round)
        chunk = self._chunk_bytes or DEFAULT_CHUNK_BYTES
        rate = self.uplink_limit_mbps
        if rate is not None:  # pace in chunks of about 50 ms of the link
            chunk = max(1024, min(chunk, int(rate * 1e6 / 8 * 0.05)))

        async def messages():
            yield pb.UpdateChunk(meta=meta)
            start = time.monotonic()
            for offset, data in iter_chunks(payload, chunk):
                if rate is not None:  # a chunk leaves no sooner than the link would have carried it
                    wait = start + (offset + len(data)) * 8.0 / (rate * 1e6) - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                yield pb.UpdateChunk(data=pb.PayloadChunk(offset=offset, data=data))

        attempt = 0
        self._pushing = True  # the run finishing now must not cut off an update the server is taking
        try:
            while True:
                try:
                    await stub.PushUpdate(messages(), metadata=self._metadata, timeout=self.call_timeout_s + len(payload) / 1e6
                                           + (len(payload) * 8.0 / (rate * 1e6) if rate is not None else 0.0))
                    return True
                except grpc.aio.AioRpcError as err:
                    code = err.code()
                    if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED):
                        self.report.refused[code.name] += 1
                        log.info("client %d: update for round %d refused: %s", cid, round, err.details())
                        return False
                    # A transient fault (connection reset, overloaded server): the update is still
                    # good until the round's deadline, so send it again rather than lose the round.
                    # If the server restarted meanwhile, the retry gets NOT_FOUND and we re-register.
                    delay = self.backoff.delay(attempt, self._rng)
                    if code not in _RETRYABLE or attempt >= self.max_push_attempts - 1 or time.monotonic() + delay > local_deadline:
                        raise
                    attempt += 1
                    self.report.retries += 1
                    log.debug("client %d: push for round %d failed (%s); retrying in %.2fs", cid, round, code.name, delay)
                    await self._sleep(delay)
        finally:
            self._pushing = False

    async def _secure_aggregate(self, stub: pb_grpc.FleetLearnStub, round: int, update, stage_s: float) -> None:
        """Take part in the round's secure aggregation (transport/grpc/secagg.py): each stage
        is one SecAggStep call the server answers when the stage closes.  A refusal or a
        server inconsistency ends this client's part in the round (it counts as dropped)."""
        from .secagg import exit_stage, take_part

        assert self._client_id is not None
        cid, fault = self._client_id, exit_stage(round)

        async def step(kind: str, body) -> pb.SecAggReply:
            request = pb.SecAggRequest(client_id=cid, session=self._session or "", round=round, **{kind: body})
            call = stub.SecAggStep(request, metadata=self._metadata, timeout=2 * stage_s + self.call_timeout_s)
            if kind == fault:  # fault injection (FLEETLEARN_SECAGG_EXIT): die right after sending this stage's message
                await asyncio.sleep(0.3)
                log.warning("client %d: exiting after SecAgg stage %s of round %d (FLEETLEARN_SECAGG_EXIT)", cid, kind, round)
                os._exit(17)
            return await call

        try:
            self.report.secagg.append({"round": round, **await take_part(cid, round, update, step, max(self.learner.spec.dim, len(update)) + 1)})
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                raise  # the server forgot this session: register again
            self.report.refused[err.code().name] += 1
            log.info("client %d: secure aggregation of round %d ended: %s", cid, round, err.details())
        except SecAggError as exc:
            self.report.refused["secagg"] += 1
            log.warning("client %d: secure aggregation of round %d aborted: %s", cid, round, exc)


def run_client(
    server: str,
    token: str,
    learner: Learner,
    data: ClientData,
    *,
    tls_ca: str | Path | None = None,
    tls: ClientTls | None = None,
    name: str = "",
    max_rounds: int | None = None,
    backoff: Backoff = Backoff(),
    give_up_after_s: float | None = None,
    stop: threading.Event | None = None,
    **kwargs: Any,
) -> ClientReport:
    """Run one client until the run finishes (blocking).  `server` is "HOST:PORT".

    TLS: pass `tls_ca` (the CA that signed the server certificate) or a full
    `ClientTls` (with a client certificate for mutual TLS).  `stop`, if given, is
    a threading.Event another thread may set to end the client early.  Raises
    `ClientRefused` when the server refuses this client for good.
    """
    if tls is None and tls_ca is not None:
        tls = ClientTls(Path(tls_ca))
    client = FleetClient(server, token, learner, data, tls=tls, name=name, max_rounds=max_rounds, backoff=backoff,
                         give_up_after_s=give_up_after_s, **kwargs)

    async def main() -> ClientReport:
        watcher = None
        if stop is not None:
            async def watch() -> None:
                while not stop.is_set():
                    await asyncio.sleep(0.05)
                client.request_stop()

            watcher = asyncio.create_task(watch())
        try:
            return await client.run()
        finally:
            if watcher is not None:
                watcher.cancel()

    return asyncio.run(main())
