"""A protocol-level client for tests: every message is explicit, nothing is retried."""

from __future__ import annotations

import threading
from typing import Iterable

import grpc

from fleetlearn.transport.grpc import fleetlearn_pb2 as pb
from fleetlearn.transport.grpc import fleetlearn_pb2_grpc as pb_grpc
from fleetlearn.transport.grpc import runtime_version
from fleetlearn.transport.grpc.chunks import iter_chunks

TIMEOUT = 10.0


class RawClient:
    def __init__(self, address: str, token: str | None, credentials: grpc.ChannelCredentials | None = None, options=()):
        opts = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20), *options]
        self.channel = grpc.secure_channel(address, credentials, opts) if credentials else grpc.insecure_channel(address, opts)
        self.stub = pb_grpc.FleetLearnStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
        self.client_id = 0
        self.session = ""
        self._beat: threading.Thread | None = None
        self._stop = threading.Event()

    def close(self) -> None:
        self.stop_heartbeats()
        self.channel.close()

    # -- calls ----------------------------------------------------------------------------
    def register(self, digest: str, runtime: str | None = None, codecs=("none",), widths=(1.0,), memory_mb: int = 0, name: str = "raw",
                 features=()) -> pb.RegisterReply:
        reply = self.stub.Register(
            pb.RegisterRequest(
                client_name=name,
                runtime_version=runtime or runtime_version(),
                capabilities=pb.Capabilities(codecs=list(codecs), model_widths=list(widths), memory_mb=memory_mb, model_digest=digest,
                                             features=list(features)),
                device=pb.DeviceProfile(compute_sps=100.0, uplink_mbps=10.0, downlink_mbps=50.0),
            ),
            metadata=self.metadata,
            timeout=TIMEOUT,
        )
        self.client_id, self.session = reply.client_id, reply.session
        return reply

    def heartbeat(self) -> pb.HeartbeatReply:
        return self.stub.Heartbeat(pb.HeartbeatRequest(client_id=self.client_id, session=self.session), metadata=self.metadata, timeout=TIMEOUT)

    def start_heartbeats(self, interval: float = 0.1) -> None:
        def beat() -> None:
            while not self._stop.wait(interval):
                try:
                    self.heartbeat()
                except grpc.RpcError:
                    pass

        self._beat = threading.Thread(target=beat, daemon=True)
        self._beat.start()

    def stop_heartbeats(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(5)
        self._stop = threading.Event()

    def pull(self, wait_s: float = 5.0, after_round: int = 0) -> tuple[pb.TaskMeta, bytes, int]:
        """(meta, payload, number of data chunks)."""
        meta, parts = None, []
        for chunk in self.stub.PullTask(
            pb.PullTaskRequest(client_id=self.client_id, session=self.session, wait_s=wait_s, after_round=after_round),
            metadata=self.metadata, timeout=wait_s + TIMEOUT,
        ):
            kind = chunk.WhichOneof("kind")
            if kind == "meta":
                meta = chunk.meta
            elif kind == "data":
                assert chunk.data.offset == sum(len(p) for p in parts)
                parts.append(chunk.data.data)
            else:
                raise AssertionError(f"unexpected {kind}")
        assert meta is not None
        return meta, b"".join(parts), len(parts)

    def meta(self, round: int, version: int, payload_bytes: int, codec: str = "none", num_examples: int = 10, **over) -> pb.UpdateChunk:
        fields = dict(client_id=self.client_id, session=self.session, round=round, base_version=version, codec=codec,
                      num_examples=num_examples, payload_bytes=payload_bytes,
                      metrics=pb.ClientMetrics(loss_before=1.0, loss_after=0.5, accuracy=0.5, compute_seconds=0.01, steps=1, samples=10))
        fields.update(over)
        return pb.UpdateChunk(meta=pb.UpdateMeta(**fields))

    def push_messages(self, messages: Iterable[pb.UpdateChunk]) -> pb.PushReply:
        return self.stub.PushUpdate(iter(list(messages)), metadata=self.metadata, timeout=TIMEOUT)

    def push(self, round: int, version: int, payload: bytes, chunk_bytes: int = 1 << 20, **meta_over) -> pb.PushReply:
        msgs = [self.meta(round, version, len(payload), **meta_over)]
        msgs += [pb.UpdateChunk(data=pb.PayloadChunk(offset=o, data=d)) for o, d in iter_chunks(payload, chunk_bytes)]
        return self.push_messages(msgs)

    def raw_unary(self, method: str, body: bytes) -> bytes:
        """Send arbitrary bytes as a request (for unparsable messages)."""
        call = self.channel.unary_unary(f"/fleetlearn.v1.FleetLearn/{method}", request_serializer=None, response_deserializer=None)
        return call(body, metadata=self.metadata, timeout=TIMEOUT)
