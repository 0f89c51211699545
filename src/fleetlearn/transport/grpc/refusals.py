"""Why the server refuses a call, and which gRPC status code says so.

Every refusal has a short reason key (counted, and put in round records) and a
sentence for the client (the status details).  The mapping to status codes is
the protocol's contract; see `fleetlearn.proto`.
"""

from __future__ import annotations

import grpc

# reason key -> status code
REASONS: dict[str, grpc.StatusCode] = {
    "bad_token": grpc.StatusCode.UNAUTHENTICATED,  # missing or unknown token
    "revoked_token": grpc.StatusCode.UNAUTHENTICATED,
    "wrong_client": grpc.StatusCode.PERMISSION_DENIED,  # the token belongs to another client id
    "wrong_region": grpc.StatusCode.PERMISSION_DENIED,  # a client of another region, or a forward for another region
    "unknown_client": grpc.StatusCode.NOT_FOUND,  # not registered (or the server restarted): register again
    "malformed": grpc.StatusCode.INVALID_ARGUMENT,  # bad field, chunks out of order, truncated payload
    "wrong_shape": grpc.StatusCode.INVALID_ARGUMENT,  # payload size cannot be the model's
    "oversized": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "incompatible": grpc.StatusCode.FAILED_PRECONDITION,  # codec, runtime version, model
    "wrong_codec": grpc.StatusCode.FAILED_PRECONDITION,
    "wrong_round": grpc.StatusCode.FAILED_PRECONDITION,  # no such round open
    "replay": grpc.StatusCode.FAILED_PRECONDITION,  # an update for a round that is over
    "wrong_version": grpc.StatusCode.FAILED_PRECONDITION,  # base model version is not the task's
    "duplicate": grpc.StatusCode.FAILED_PRECONDITION,  # this client already replied this round
    "after_deadline": grpc.StatusCode.FAILED_PRECONDITION,
    "round_closed": grpc.StatusCode.FAILED_PRECONDITION,  # the coordinator stopped collecting (cohort filled)
    "not_selected": grpc.StatusCode.FAILED_PRECONDITION,  # the client is not in this round's cohort
    "dropped": grpc.StatusCode.FAILED_PRECONDITION,  # already reported to the Coordinator as dropped
    "too_many_calls": grpc.StatusCode.RESOURCE_EXHAUSTED,  # this client has Limits.max_calls_per_client calls open
    "busy": grpc.StatusCode.UNAVAILABLE,  # the server has Limits.max_calls calls open: retry later
    "timeout": grpc.StatusCode.DEADLINE_EXCEEDED,  # a call sent no message within Limits.first_message_s
    "stalled": grpc.StatusCode.DEADLINE_EXCEEDED,  # an upload sent no chunk within Limits.upload_idle_s: client dropped
    "internal": grpc.StatusCode.INTERNAL,  # a bug on the server; counted, never fatal
}


class Refusal(Exception):
    """A refused call: `reason` is a key of `REASONS`, `detail` a sentence for the client."""

    def __init__(self, reason: str, detail: str):
        if reason not in REASONS:
            raise ValueError(f"unknown refusal reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    @property
    def code(self) -> grpc.StatusCode:
        return REASONS[self.reason]
