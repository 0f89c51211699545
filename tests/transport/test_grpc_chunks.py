"""Chunked streaming: payloads far beyond gRPC's 4 MB message limit, byte-exact."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from grpc_test_support import DispatchThread, make_task, tiny_data

from fleetlearn.compression import parse_chain
from fleetlearn.learners.base import FitResult, SingleClientLearner
from fleetlearn.messages import Update
from fleetlearn.params import ParamSpec
from fleetlearn.transport.grpc import Backoff, GrpcTransport, Refusal, run_client
from fleetlearn.transport.grpc.chunks import PayloadAssembler, iter_chunks

BIG = 6_000_000  # float32 values: 24 MB, six times gRPC's default message limit


def test_iter_chunks_and_assembler_round_trip():
    payload = bytes(range(256)) * 1000 + b"tail"
    pieces = list(iter_chunks(payload, 4096))
    assert [o for o, _ in pieces] == list(range(0, len(payload), 4096))
    assert max(len(d) for _, d in pieces) == 4096
    asm = PayloadAssembler(len(payload), limit=len(payload), chunk_limit=4096)
    for o, d in pieces:
        asm.add(o, d)
    assert asm.finish() == payload
    assert list(iter_chunks(b"", 10)) == []
    assert PayloadAssembler(0, 10, 10).finish() == b""


@pytest.mark.parametrize(
    "announced, chunks, reason, words",
    [
        (10, [(0, b"12345"), (6, b"67890")], "malformed", "expected offset 5"),
        (10, [(0, b"12345")], "malformed", "truncated"),
        (4, [(0, b"12345")], "malformed", "more than"),
        (10, [(0, b"")], "malformed", "empty"),
        (10, [(0, b"1234567890")], "oversized", "chunk limit"),
        (100, [], "oversized", "exceeds the limit"),
    ],
)
def test_assembler_refusals(announced, chunks, reason, words):
    with pytest.raises(Refusal) as err:
        asm = PayloadAssembler(announced, limit=50, chunk_limit=8)
        for o, d in chunks:
            asm.add(o, d)
        asm.finish()
    assert err.value.reason == reason and words in err.value.detail


class EchoLearner(SingleClientLearner):
    """Returns delta = params + 1: what comes back proves both directions were exact."""

    def __init__(self, dim: int):
        self.spec = ParamSpec(("w",), ((dim,),))

    def fit(self, params, data, hp, seed, correction=None, max_steps=None):
        return FitResult(delta=params + 1.0, num_examples=data.num_examples, loss_before=1.0, loss_after=0.5,
                         accuracy=float("nan"), steps=1, samples=data.num_examples, compute_seconds=0.0)


def test_a_24_megabyte_model_streams_both_ways_exactly(tokens):
    learner = EchoLearner(BIG)
    with GrpcTransport(tokens=tokens, spec=learner.spec, heartbeat_interval_s=0.5) as t:
        tok = tokens.add("big")
        done = threading.Event()
        th = threading.Thread(
            target=lambda: (run_client(t.address, tok, learner, tiny_data(0), max_rounds=1, backoff=Backoff(0.05, 0.5)), done.set()),
            daemon=True,
        )
        th.start()
        assert t.wait_available(1, timeout_s=10)
        params = torch.randn(BIG, generator=torch.Generator().manual_seed(3))
        task = make_task(1, 0, params, deadline_s=30.0)
        assert task.nbytes > 6 * (4 << 20) * 0.95
        t0 = time.monotonic()
        (reply,) = list(t.dispatch(task, t.available(1)))
        assert isinstance(reply.message, Update), reply.message
        u = reply.message
        assert u.downlink_bytes == task.nbytes
        assert torch.equal(parse_chain("none").decode(u.payload), params + 1.0)
        assert time.monotonic() - t0 < 20
        assert done.wait(10)
        assert t.refusals_total() == {}


def test_server_limits_update_size(tokens):
    """A payload over `max_update_bytes` is refused before any of it is buffered."""
    from grpc_raw_client import RawClient
    import grpc

    from fleetlearn.transport.grpc import Limits

    learner = EchoLearner(1000)
    with GrpcTransport(tokens=tokens, spec=None, limits=Limits(max_update_bytes=2000), heartbeat_interval_s=0.2) as t:
        c = RawClient(t.address, tokens.add("x"))
        c.register("")
        d = DispatchThread(t, make_task(1, 0, torch.zeros(1000)), [c.client_id])
        c.pull()
        with pytest.raises(grpc.RpcError) as err:
            c.push(1, 0, parse_chain("none").encode(torch.zeros(1000))[0])
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "2000" in err.value.details()
        c.push(1, 0, parse_chain("none").encode(torch.zeros(100))[0])  # spec=None: any size within the limit
        d.join()
        assert t.refusals_total() == {"oversized": 1}
        del learner
        c.close()
