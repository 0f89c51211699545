"""Network input the server and clients must survive: unauthenticated and silent streams,
oversized messages, decompression bombs, stalled uploads, certificate mistakes."""

from __future__ import annotations

import gc
import json
import logging
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import grpc
import pytest
import torch
import zstandard
from grpc_raw_client import RawClient
from grpc_test_support import DispatchThread, IdleStreams, live_rss_mb, make_task

from fleetlearn.compression import parse_chain, wire
from fleetlearn.learners import TorchLearner, logistic
from fleetlearn.transport.grpc import fleetlearn_pb2 as pb
from fleetlearn.messages import Dropout, Task, Update
from fleetlearn.transport.grpc import GrpcTransport, Limits

HERE = Path(__file__).parent


def zstd_bomb(size: int, claimed_dim: int = 2**28 - 1) -> bytes:
    """A valid-looking dense payload (magic, version, CRC) whose zstd body inflates to `size`
    zero bytes: a few KB on the wire.  Its header claims `claimed_dim`, whose body bound
    (`wire.max_body_bytes`) admits `size`."""
    frame = zstandard.ZstdCompressor().compress(bytes(size))
    body = wire.HEADER.pack(wire.MAGIC, wire.VERSION, wire.SUPPORT_DENSE | wire.SUPPORT_ZSTD_FLAG, wire.VALUE_F32, claimed_dim)
    body += struct.pack("<I", size) + frame
    return body + struct.pack("<I", wire.checksum(body))


# -- item 7: decompression bombs are bounded by the receiver's dimension ----------------------
def test_a_client_refuses_a_task_bomb_without_inflating_it(transport, tokens, learner):
    tok = tokens.add("bombed")
    proc = subprocess.Popen([sys.executable, str(HERE / "grpc_client_process.py"), transport.address, tok],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        (cid,) = transport.wait_available(1, timeout_s=30)
        params = learner.init_params(0)
        bomb = zstd_bomb(512 << 20)
        assert len(bomb) < 64 << 10
        task = Task(1, 0, bomb, "none", {"lr": 0.1, "local_epochs": 1, "batch_size": 4}, deadline_s=2.0)
        (r1,) = list(transport.dispatch(task, [cid]))
        assert isinstance(r1.message, Dropout)  # the client skipped the task it could not use
        (r2,) = list(transport.dispatch(make_task(2, 0, params, deadline_s=20.0), [cid]))
        assert isinstance(r2.message, Update)  # ... and took part in the next round
        transport.finish()
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["skipped_bad_task"] == 1 and report["rounds"] == [2] and report["stopped"] == "finished"
    assert report["peak_growth_mb"] < 100, report
    assert "dim 268435455" in err  # the client says why it skipped the task


# -- item 6: calls are authenticated from metadata before any message is read -------------------
def test_idle_unauthenticated_calls_are_refused_at_once_and_hold_no_memory(transport, tokens):
    n = 3000
    before = live_rss_mb()
    idle = IdleStreams(transport.address, n, wait_s=20.0)
    try:
        got = idle.result()
        held = live_rss_mb() - before  # measured while the attacker still holds its side of every call
    finally:
        idle.close()
    assert got == {"open": 0, "codes": {"UNAUTHENTICATED": n}}, got
    assert transport.refusals_total() == {"bad_token": n}
    # Each idle call held about 22 KiB before (3000 calls: ~66 MiB, 20,000: ~460 MiB).
    assert held < 20, f"{n} idle unauthenticated calls left the server holding {held:.0f} MiB more"


def idle_calls(t: GrpcTransport, token: str) -> dict:
    """16 silent calls at once: 4 with `token`, 4 with a wrong token, 8 with none."""
    idle = IdleStreams(t.address, 16, wait_s=15.0, token=token)
    try:
        return idle.result()
    finally:
        idle.close()


def test_a_clients_calls_are_bounded_and_silent_calls_time_out(tokens, learner):
    with GrpcTransport(tokens=tokens, spec=learner.spec, limits=Limits(max_calls_per_client=3, first_message_s=1.0)) as t:
        got = idle_calls(t, tokens.add("hog"))
        # the token's first 3 calls hold its slots until they time out; its 4th is refused at once
        assert got == {"open": 0, "codes": {"UNAUTHENTICATED": 12, "RESOURCE_EXHAUSTED": 1, "DEADLINE_EXCEEDED": 3}}, got
        assert t.refusals_total() == {"bad_token": 12, "too_many_calls": 1, "timeout": 3}
        assert t.server.calls_in_progress() == (0, {})  # every slot given back


def test_calls_in_total_are_bounded_and_refused_as_busy(tokens, learner):
    with GrpcTransport(tokens=tokens, spec=learner.spec, limits=Limits(max_calls=2, first_message_s=1.0)) as t:
        got = idle_calls(t, tokens.add("crowd"))
        assert got == {"open": 0, "codes": {"UNAUTHENTICATED": 12, "UNAVAILABLE": 2, "DEADLINE_EXCEEDED": 2}}, got
        assert t.refusals_total() == {"bad_token": 12, "busy": 2, "timeout": 2}
        assert t.server.calls_in_progress() == (0, {})


def test_the_server_refuses_an_update_bomb_before_the_coordinator_decodes_it(tokens):
    # A model big enough that "q8 | zstd" admits a ~16 KB update: the size bound alone lets the bomb in.
    learner = TorchLearner(lambda: logistic(2000, 10), vectorize=False)
    with GrpcTransport(tokens=tokens, spec=learner.spec, uplink="q8 | zstd", heartbeat_interval_s=0.2) as t:
        c = RawClient(t.address, tokens.add("bomber"))
        c.register(learner.spec.digest(), codecs=("q8", "zstd"))
        c.start_heartbeats(0.05)
        params = learner.init_params(0)
        d = DispatchThread(t, make_task(1, 0, params, deadline_s=10.0), [c.client_id])
        c.pull()
        bomb = zstd_bomb(512 << 20)
        assert len(bomb) <= t.requirements.update_bytes_max
        with pytest.raises(grpc.RpcError) as err:
            c.push(1, 0, bomb, codec="q8 | zstd")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"is for a vector of dim 268435455; the run's model has {learner.spec.dim}" in err.value.details()
        good, _ = parse_chain("q8 | zstd").encode(torch.zeros(learner.spec.dim))
        c.push(1, 0, good, codec="q8 | zstd")  # the same client, with a real update
        (reply,) = d.join()
        assert isinstance(reply.message, Update) and reply.message.payload == good
        assert t.refusals_total() == {"wrong_shape": 1}
        c.close()


# -- item 8: a message over gRPC's size limit is refused without a traceback -------------------
def test_an_oversized_message_is_refused_without_a_traceback(tokens, learner, caplog):
    caplog.set_level(logging.DEBUG)
    # Heartbeats every 1 s (a client is dropped after 3 s without one): the two oversized
    # messages and the full collection below can hold this loaded process for over half a
    # second, and a dropped client would end the round before the real update arrives.
    with GrpcTransport(tokens=tokens, spec=learner.spec, heartbeat_interval_s=1.0, limits=Limits(chunk_bytes=1 << 16)) as t:
        c = RawClient(t.address, tokens.add("big"))
        c.register(learner.spec.digest())
        c.start_heartbeats(0.05)
        params = learner.init_params(0)
        payload = parse_chain("none").encode(params)[0]
        d = DispatchThread(t, make_task(1, 0, params, deadline_s=10.0), [c.client_id])
        c.pull()
        huge = pb.UpdateChunk(data=pb.PayloadChunk(offset=0, data=bytes(t.limits.max_message_bytes + 1)))
        for messages in ([c.meta(1, 0, len(payload)), huge], [huge]):  # as a chunk, and as the first message
            with pytest.raises(grpc.RpcError) as err:
                c.push_messages(messages)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in err.value.details()
        time.sleep(0.3)
        gc.collect()  # an abandoned task reports its unread exception when it is collected
        c.push(1, 0, payload)  # the run goes on
        (reply,) = d.join()
        assert isinstance(reply.message, Update)
        c.close()
    noisy = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR or "never retrieved" in r.getMessage()]
    assert not noisy, [r.getMessage() for r in noisy]


# -- item 9: a stalled upload times out and the client is dropped, without a deadline ---------
def test_a_stalled_upload_times_out_and_its_client_is_dropped(tokens, learner):
    limits = Limits(upload_idle_s=0.5)
    with GrpcTransport(tokens=tokens, spec=learner.spec, heartbeat_interval_s=0.1, max_round_s=60.0, limits=limits) as t:
        c = RawClient(t.address, tokens.add("staller"))
        c.register(learner.spec.digest())
        c.start_heartbeats(0.05)  # alive all along: only the upload stalls
        params = learner.init_params(0)
        payload = parse_chain("none").encode(params)[0]
        d = DispatchThread(t, make_task(1, 0, params, deadline_s=None), [c.client_id])  # no deadline: max_round_s
        c.pull()
        release = threading.Event()

        def frames():
            yield c.meta(1, 0, len(payload))
            yield pb.UpdateChunk(data=pb.PayloadChunk(offset=0, data=payload[:10]))
            release.wait(30)  # the rest never comes

        with pytest.raises(grpc.RpcError) as err:
            c.stub.PushUpdate(frames(), metadata=c.metadata, timeout=30)
        release.set()
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "stalled" in err.value.details()
        (drop,) = d.join(timeout=20)  # long before max_round_s
        assert isinstance(drop.message, Dropout) and "upload stalled: no message for 0.5s" in drop.message.reason
        assert t.refusals_total() == {"stalled": 1}
        # a retry of the same update is told it was dropped
        with pytest.raises(grpc.RpcError) as err:
            c.push(1, 0, payload)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        c.close()


def test_limits_are_checked():
    for bad in (dict(upload_idle_s=0), dict(first_message_s=float("nan")), dict(max_calls_per_client=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Limits(**bad)
