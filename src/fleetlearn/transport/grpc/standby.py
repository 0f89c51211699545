"""A standby's address while it waits for the leader lease (`fleetlearn server --resume RUN
--standby`).

Until it leads, a standby serves no run, but its address is in every client's server list.
If nothing listened there, a client whose leader died would find both addresses dead and
back off exponentially, and would come back seconds after the standby took over (a takeover
measured 10 s of lease expiry plus 8 s of the clients' backoff).  So the standby listens at
once and answers every call UNAVAILABLE with the server's retry-after hint (trailing
metadata ``retry-after-ms``, as an overloaded server does): the client learns that the
service is alive, starts its backoff over and tries again after the hint (failing over to
the next address as for any UNAVAILABLE, so a client never sticks to a standby while the
leader serves).  `StandbyEndpoint.stop` frees the address just before the run's own server
binds it.
"""

from __future__ import annotations

from concurrent import futures
from typing import Callable

import grpc

from . import fleetlearn_pb2 as pb
from .certs import ServerTls
from .server import RETRY_AFTER_HEADER

SERVICE = pb.DESCRIPTOR.services_by_name["FleetLearn"]


class _NotLeading(grpc.GenericRpcHandler):
    def __init__(self, message: str, retry_after_s: float):
        self.message = message
        self.meta = ((RETRY_AFTER_HEADER, str(int(round(retry_after_s * 1000)))),)
        self.kinds = {f"/{SERVICE.full_name}/{m.name}": (m.client_streaming, m.server_streaming) for m in SERVICE.methods}

    def _refuse(self, request, context: grpc.ServicerContext):  # noqa: ANN001
        context.set_trailing_metadata(self.meta)
        context.abort(grpc.StatusCode.UNAVAILABLE, self.message)

    def service(self, details: grpc.HandlerCallDetails):
        kind = self.kinds.get(details.method)
        if kind is None:
            return None  # not ours: UNIMPLEMENTED, as the run's server answers
        make: Callable = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[kind]
        return make(self._refuse)  # raw bytes in: nothing of the request is parsed


class StandbyEndpoint:
    """Listen on `address` (TLS with `tls`, else plaintext) and refuse every call UNAVAILABLE
    with a retry-after of `retry_after_s` and `message`, until `stop`."""

    def __init__(self, address: str, tls: ServerTls | None, retry_after_s: float, message: str):
        if not retry_after_s > 0:
            raise ValueError(f"retry_after_s must be > 0, got {retry_after_s}")
        self.address = address
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="fleetlearn-standby"),
                                   handlers=(_NotLeading(message, retry_after_s),),
                                   options=[("grpc.so_reuseport", 0)])
        port = self._server.add_secure_port(address, tls.credentials()) if tls is not None else self._server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"cannot listen on {address}")
        self.port = port

    def start(self) -> "StandbyEndpoint":
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None).wait(5)
