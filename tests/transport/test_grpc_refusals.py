"""Every kind of bad update gets its precise status code, is counted, and hurts nothing."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_test_support import DispatchThread, make_task
from grpc_raw_client import RawClient

from fleetlearn.compression import parse_chain
from fleetlearn.messages import Update
from fleetlearn.transport.grpc import GrpcTransport, Limits
from fleetlearn.transport.grpc import fleetlearn_pb2 as pb

FP = grpc.StatusCode.FAILED_PRECONDITION
IA = grpc.StatusCode.INVALID_ARGUMENT
RE = grpc.StatusCode.RESOURCE_EXHAUSTED


def refused(fn, code: grpc.StatusCode, words: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    assert err.value.code() == code, (err.value.code(), err.value.details())
    assert words in err.value.details(), err.value.details()


@pytest.fixture
def pair(transport, tokens, learner):
    toks = tokens.add_many(["a", "b"])
    cs = [RawClient(transport.address, toks[n]) for n in ("a", "b")]
    for c in cs:
        c.register(learner.spec.digest())
        c.start_heartbeats(0.05)
    yield cs
    for c in cs:
        c.close()


def data(chunk: pb.PayloadChunk) -> pb.UpdateChunk:
    return pb.UpdateChunk(data=chunk)


def test_each_refusal_has_its_status_and_is_counted(transport, learner, pair):
    a, b = pair
    params = learner.init_params(0)
    payload = parse_chain("none").encode(params)[0]
    n = len(payload)

    # round 1: a replies, b tries everything wrong
    d1 = DispatchThread(transport, make_task(1, 0, params), [a.client_id])
    a.pull()
    a.push(1, 0, payload)
    d1.join()
    refused(lambda: a.push(1, 0, payload), FP, "already sent")  # duplicate
    refused(lambda: b.push(1, 0, payload), FP, "not in the cohort")  # not selected

    # round 2 (version 1) for both
    d2 = DispatchThread(transport, make_task(2, 1, params), [a.client_id, b.client_id])
    a.pull(after_round=1)
    refused(lambda: a.push(1, 0, payload), FP, "round 1 is over")  # replay of an old round
    refused(lambda: a.push(3, 1, payload), FP, "no round 3")  # a round that does not exist
    refused(lambda: a.push(2, 0, payload), FP, "model version 0")  # wrong (stale) version
    refused(lambda: a.push(2, 1, payload, codec="q8"), FP, "uplink chain")  # wrong codec
    refused(lambda: a.push(2, 1, payload + b"\0\0\0\0"), IA, "cannot be the model's")  # wrong shape
    refused(lambda: a.push(2, 1, payload, num_examples=-5), IA, "negative")
    refused(lambda: a.push_messages([data(pb.PayloadChunk(offset=0, data=payload))]), IA, "first message")
    refused(lambda: a.push_messages([a.meta(2, 1, n), a.meta(2, 1, n)]), IA, "sent twice")
    refused(lambda: a.push_messages([a.meta(2, 1, n), data(pb.PayloadChunk(offset=8, data=payload))]), IA, "expected offset 0")
    refused(lambda: a.push_messages([a.meta(2, 1, n), data(pb.PayloadChunk(offset=0, data=payload[:-4]))]), IA, "truncated")
    refused(lambda: a.push_messages([a.meta(2, 1, n), data(pb.PayloadChunk(offset=0, data=payload + b"xxxx"))]), IA, "more than")
    refused(lambda: a.push_messages([]), IA, "empty PushUpdate")
    refused(lambda: a.push_messages([a.meta(2, 1, 1 << 40)]), RE, "exceeds the limit")  # oversized announcement
    refused(lambda: a.raw_unary("Heartbeat", b"\xff\xff\xff\xff"), IA, "cannot parse")  # not protobuf
    # after all that, a good update is still accepted, and the round is unharmed
    a.push(2, 1, payload)
    b.pull(after_round=1)
    b.push(2, 1, payload)
    replies = d2.join()
    assert sorted(r.message.client_id for r in replies) == sorted([a.client_id, b.client_id])
    assert all(isinstance(r.message, Update) for r in replies)

    assert transport.refusals_total() == {
        "duplicate": 1, "not_selected": 1, "replay": 1, "wrong_round": 1, "wrong_version": 1, "wrong_codec": 1,
        "wrong_shape": 1, "malformed": 8, "oversized": 1,
    }
    assert transport.refusals_since(2) == {k: v for k, v in transport.refusals_total().items() if k not in ("duplicate", "not_selected")}
    taken = transport.take_refusals()
    assert taken == transport.refusals_total() and transport.take_refusals() == {}


def test_unknown_client_and_stale_session_say_register_again(transport, tokens, learner):
    tok = tokens.add("late-joiner")
    c = RawClient(transport.address, tok)
    c.client_id, c.session = tokens.client_id("late-joiner"), "nope"
    refused(c.heartbeat, grpc.StatusCode.NOT_FOUND, "register again")  # never registered
    c.register(learner.spec.digest())
    old = c.session
    c.register(learner.spec.digest())
    c.session = old
    refused(c.heartbeat, grpc.StatusCode.NOT_FOUND, "not current")
    assert transport.refusals_total() == {"unknown_client": 2}
    c.close()


def test_after_deadline_and_oversized_chunks(tokens, learner):
    limits = Limits(chunk_bytes=64)  # tiny chunks so one chunk is easily too large
    with GrpcTransport(tokens=tokens, spec=learner.spec, heartbeat_interval_s=0.1, limits=limits) as t:
        c = RawClient(t.address, tokens.add("slow"))
        c.register(learner.spec.digest())
        c.start_heartbeats(0.05)
        params = learner.init_params(0)
        payload = parse_chain("none").encode(params)[0]
        assert len(payload) > 64
        d = DispatchThread(t, make_task(1, 0, params, deadline_s=0.4), [c.client_id])
        meta, got, chunks = c.pull()
        assert got == payload and chunks == -(-len(payload) // 64)  # the server sends 64-byte chunks
        refused(lambda: c.push(1, 0, payload, chunk_bytes=128), RE, "chunk limit")
        (drop,) = d.join()
        time.sleep(0.05)
        refused(lambda: c.push(1, 0, payload, chunk_bytes=64), FP, "deadline")
        assert t.refusals_total() == {"oversized": 1, "after_deadline": 1}
        c.close()


def test_a_stalled_upload_is_cut_when_the_round_closes(transport, tokens, learner):
    c = RawClient(transport.address, tokens.add("staller"))
    c.register(learner.spec.digest())
    c.start_heartbeats(0.05)
    params = learner.init_params(0)
    payload = parse_chain("none").encode(params)[0]
    d = DispatchThread(transport, make_task(1, 0, params, deadline_s=0.5), [c.client_id])
    c.pull()
    release = threading.Event()

    def frames():
        yield c.meta(1, 0, len(payload))
        release.wait(10)  # never sends the payload (until the test ends)

    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        c.stub.PushUpdate(frames(), metadata=c.metadata, timeout=10)
    release.set()
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "before the update was complete" in err.value.details()
    assert time.monotonic() - t0 < 3  # cut at the 0.5 s deadline, not at the 10 s call timeout
    (drop,) = d.join()
    assert "deadline" in drop.message.reason
    assert transport.refusals_total() == {"after_deadline": 1}
    c.close()


def test_calls_a_client_cancels_as_they_start_are_not_refusals(transport, tokens, learner):
    # A client that stops cancels its in-flight heartbeat; the server saw the stream end with
    # no message and counted "malformed" in about 3 % of such cancellations (a flaky
    # test_grpc_label_skew).  A stream that really ends without a message is still refused.
    import asyncio
    import random

    from fleetlearn.transport.grpc import fleetlearn_pb2_grpc as pb_grpc

    c = RawClient(transport.address, tokens.add("quitter"))
    c.register(learner.spec.digest())

    async def cancel_many(n: int) -> None:
        rng = random.Random(0)
        async with grpc.aio.insecure_channel(transport.address) as ch:
            stub = pb_grpc.FleetLearnStub(ch)
            for _ in range(n):
                call = asyncio.ensure_future(stub.Heartbeat(pb.HeartbeatRequest(client_id=c.client_id, session=c.session),
                                                            metadata=c.metadata, timeout=1.0))
                await asyncio.sleep(rng.choice([0, 0, 0.0001, 0.0005, 0.001]))
                call.cancel()
                try:
                    await call
                except (asyncio.CancelledError, grpc.aio.AioRpcError):
                    pass

    asyncio.run(cancel_many(600))
    time.sleep(0.3)
    assert transport.refusals_total() == {}, list(transport.server.refusals.log)[:3]
    empty = c.channel.stream_unary("/fleetlearn.v1.FleetLearn/Heartbeat", request_serializer=None, response_deserializer=None)
    refused(lambda: empty(iter([]), metadata=c.metadata, timeout=5), IA, "no HeartbeatRequest in the call")
    assert transport.refusals_total() == {"malformed": 1}
    c.close()
