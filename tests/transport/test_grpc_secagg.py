"""Secure aggregation over gRPC (transport/grpc/secagg.py): `fleetlearn server` and real
`fleetlearn client` processes on 127.0.0.1 with TLS and tokens run the SecAgg stages; the
unmasked sum equals the plain sum of the clients' quantized rows exactly, with clients
killed at a stage, and the server never receives an individual update.  Plus registration
refusal, and malformed / replayed SecAgg messages refused while the round carries on."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from grpc_raw_client import RawClient
from grpc_test_support import CLASSES, FEATURES, DispatchThread, make_task

from fleetlearn.learners import TorchLearner, logistic
from fleetlearn.messages import Update
from fleetlearn.privacy.quantize import Quantizer
from fleetlearn.privacy.secagg import RowRecipe, SecAggClient, SecureAggregation
from fleetlearn.transport.grpc import GrpcTransport
from fleetlearn.transport.grpc import fleetlearn_pb2 as pb
from fleetlearn.transport.grpc import secagg as wire

CLIENTS = 6
CONFIG = """
seed = 5
[data]
dataset = "digits"
clients = {clients}
partition = "iid"
[client]
local_epochs = 1
batch_size = 32
lr = 0.05
[server]
rounds = 3
cohort = {clients}
deadline_s = 120.0
[privacy]
secure_aggregation = true
[monitoring]
detectors = []
"""


# `fleetlearn client` for site0's token, set up at once but started only when told (on stdin).
SPARE = """
import sys
from fleetlearn.transport.grpc import commands
from fleetlearn.transport.grpc.local_data import client_from_config, run_config
address, token, config, ca = sys.argv[1:5]
client_from_config(run_config(config), client_index=0)  # warm: imports, data
sys.stdin.readline()
commands.client(address, token, config, client_index=0, tls_ca=ca, give_up_after_s=120)
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fl(args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "fleetlearn", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, **kw)


def _client(tmp: Path, port: int, token: str, index: int, env: dict):
    return _fl(["client", "--server", f"127.0.0.1:{port}", "--token", token, "--config", str(tmp / "run.toml"), "--client-index", str(index),
                "--tls-ca", str(tmp / "certs" / "ca.pem"), "--give-up-after", "120"], env=env, cwd=tmp)


@pytest.mark.slow
def test_secagg_over_grpc_sums_exactly_with_dropouts_and_the_server_never_sees_an_update(tmp_path):
    """Round 1: no dropout.  Round 2: one client process dies right after sending its key
    shares (its pairwise masks are reconstructed; a fresh process with its token rejoins for
    round 3).  Round 3: 2 of the 6 clients (33%, at least the 30% asked) die right after
    sending their masked input (their self masks are reconstructed, their rows count)."""
    from fleetlearn.transport.grpc import commands

    (tmp_path / "run.toml").write_text(CONFIG.format(clients=CLIENTS))
    commands.certs(tmp_path / "certs")
    tokens = [commands.token_add(tmp_path / "state", f"site{i}") for i in range(CLIENTS)]
    ids = {t.name: t.client_id for t in commands.token_list(tmp_path / "state")}
    dump, inputs = tmp_path / "server-received", tmp_path / "client-rows"
    port = _free_port()
    server = _fl(["server", str(tmp_path / "run.toml"), "--listen", f"127.0.0.1:{port}", "--state", str(tmp_path / "state"),
                  "--certs", str(tmp_path / "certs"), "--min-clients", str(CLIENTS), "--wait-s", "300", "--heartbeat-s", "0.5",
                  "--runs-dir", str(tmp_path / "runs"), "--json"], env={wire.DUMP_ENV: str(dump)}, cwd=tmp_path)
    faults = {0: "2:share_keys", 1: "3:masked_input", 2: "3:masked_input"}  # 2 of 6 (33%) in round 3
    procs = [_client(tmp_path, port, tok, i, {wire.INPUT_DUMP_ENV: str(inputs), **({wire.EXIT_ENV: faults[i]} if i in faults else {})})
             for i, tok in enumerate(tokens)]
    # site0 dies in round 2; a new process with its token (started now, it waits to be told) joins for round 3.
    spare = subprocess.Popen([sys.executable, "-c", SPARE, f"127.0.0.1:{port}", tokens[0], str(tmp_path / "run.toml"), str(tmp_path / "certs" / "ca.pem")],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, wire.INPUT_DUMP_ENV: str(inputs)}, cwd=tmp_path)
    procs.append(spare)
    try:
        procs[0].wait(timeout=600)  # died in round 2 (fault injection)
        assert procs[0].returncode == 17, procs[0].stderr.read()[-2000:]
        spare.stdin.write("go\n")
        spare.stdin.flush()
        out, err = server.communicate(timeout=600)
        assert server.returncode == 0, err[-3000:]
    finally:
        for p in procs + [server]:
            if p.poll() is None:
                p.kill()
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["rounds"] == 3

    from fleetlearn.ops import RunStore

    recs = RunStore.open(summary["run_dir"]).records()
    assert [r.status for r in recs] == ["ok", "ok", "ok"], [r.reason for r in recs]
    everyone = sorted(ids.values())
    sums = {}
    for f in dump.glob("r*-sum-*.bin"):
        got = json.loads(f.read_bytes())
        sums[int(f.name[1:].split("-")[0])] = got
    assert sorted(sums) == [1, 2, 3]
    assert sums[1]["survivors"] == everyone
    assert sums[2]["survivors"] == [c for c in everyone if c != ids["site0"]]  # died before masking
    assert sums[3]["survivors"] == everyone  # died after masking: their rows count
    mask = (1 << sums[1]["modulus_bits"]) - 1
    rows = {}
    for r, got in sums.items():
        rows[r] = {c: np.load(inputs / f"r{r}-c{c}.npy") for c in got["survivors"]}
        plain = np.sum(np.stack(list(rows[r].values())), axis=0, dtype=np.uint64) & np.uint64(mask)
        assert np.array_equal(np.asarray(got["sum"], dtype=np.uint64), plain), f"round {r}: unmasked sum != plain sum of the quantized rows"
    # The round records count the protocol and name who dropped.
    assert recs[1].extra["secagg_dropped"] == [ids["site0"]] and recs[2].extra["secagg_dropped"] == []
    assert recs[1].accepted == CLIENTS - 1 and recs[2].accepted == CLIENTS
    for rec in recs:  # every SecAgg message counted: in the record's extra and in its uplink / downlink bytes
        assert rec.extra["secagg_uplink_bytes"] > (CLIENTS - 1) * 4 * len(rows[1][everyone[0]])
        assert rec.uplink_bytes == rec.extra["secagg_uplink_bytes"]  # the updates themselves carry no payload
        assert rec.downlink_bytes > rec.extra["secagg_downlink_bytes"] > 0  # the model, plus the SecAgg answers
        assert set(rec.extra["secagg_stage_bytes"]) == set(wire.STAGES)
    # Everything the server process received: updates without payload, and no client's row.
    received = [f.read_bytes() for f in dump.glob("r*.bin") if "-sum-" not in f.name]
    updates = [f for f in dump.glob("r*-update-*.bin")]
    assert len(updates) == 3 * CLIENTS and all(f.stat().st_size < 200 for f in updates)  # metadata only
    assert len(list(dump.glob("r*-secagg-masked_input-*.bin"))) == 3 * CLIENTS - 1  # site0 died before masking in round 2
    for r in rows:
        for c, row in rows[r].items():
            needle = row.astype("<u4").tobytes()[:256]
            assert not any(needle in blob for blob in received), f"client {c}'s quantized row of round {r} reached the server"


# -- in-process: registration, malformed and replayed messages -----------------------------------------
@pytest.fixture()
def learner():
    return TorchLearner(lambda: logistic(FEATURES, CLASSES), vectorize=False)


@pytest.fixture()
def tokens(tmp_path):
    from fleetlearn.transport.grpc import TokenStore

    store = TokenStore.open(tmp_path / "state")
    yield store
    store.close()


def _register(c: RawClient, digest: str, features=("secagg",)):
    from fleetlearn.transport.grpc import runtime_version

    reply = c.stub.Register(pb.RegisterRequest(client_name="raw", runtime_version=runtime_version(), capabilities=pb.Capabilities(
        codecs=["none"], model_widths=[1.0], model_digest=digest, features=list(features))), metadata=c.metadata, timeout=10)
    c.client_id, c.session = reply.client_id, reply.session
    return reply


def _start_round(t: GrpcTransport, raws: dict, learner, heartbeat_s: float = 0.1, deadline_s: float = 20.0) -> dict[str, int]:
    """Register the raw clients, dispatch round 1 to them; each pushes its update's metadata
    (the update stays on the device).  Returns name -> client id."""
    for c in raws.values():
        _register(c, learner.spec.digest())
        c.start_heartbeats(heartbeat_s)
    cid = {n: int(c.client_id) for n, c in raws.items()}
    disp = DispatchThread(t, make_task(1, 0, learner.init_params(0), deadline_s=deadline_s), sorted(cid.values()))
    for c in raws.values():
        meta, _, _ = c.pull()
        assert meta.secagg and meta.secagg_stage_s == deadline_s
        assert c.push(1, 0, b"").accepted  # the update stays on the device
    replies = disp.join()
    assert sorted(r.message.client_id for r in replies if isinstance(r.message, Update)) == sorted(cid.values())
    assert all(len(r.message.payload) == 0 for r in replies)
    return cid


def _secure_sum_thread(t: GrpcTransport, ids, secure: SecureAggregation) -> tuple[threading.Thread, dict]:
    """The server's side of the round's secure aggregation, on a thread (as the Coordinator's step)."""
    result: dict = {}
    runner = threading.Thread(target=lambda: result.setdefault("sum", t.secure_sum(1, sorted(ids), [1.0 / len(ids)] * len(ids), RowRecipe(), secure)),
                              daemon=True)
    runner.start()
    return runner, result


def _run_parties(party, names, runner: threading.Thread, errors: list) -> None:
    """Each client's side on its own thread (`party(name)` appends what it raised to `errors`), then the server's."""
    threads = [threading.Thread(target=party, args=(n,), daemon=True) for n in names]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    runner.join(60)
    assert not errors, errors


def _call(c: RawClient, round: int = 1, **body) -> pb.SecAggReply:
    return c.stub.SecAggStep(pb.SecAggRequest(client_id=c.client_id, session=c.session, round=round, **body), metadata=c.metadata, timeout=30)


def _expect_refusal(refused: dict, key: str, fn) -> None:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    refused[key] = (err.value.code(), err.value.details())


def test_a_client_without_the_secagg_feature_is_refused_at_registration(tokens, learner):
    t = GrpcTransport("127.0.0.1:0", tokens=tokens, spec=learner.spec, secagg=True, heartbeat_interval_s=1.0)
    old, new = RawClient(t.address, tokens.add("old")), RawClient(t.address, tokens.add("new"))
    try:
        with pytest.raises(grpc.RpcError) as err:
            _register(old, learner.spec.digest(), features=("scaffold",))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "lacks protocol feature(s) secagg" in err.value.details()
        assert _register(new, learner.spec.digest()).accepted
        assert t.refusals_total() == {"incompatible": 1}
    finally:
        old.close()
        new.close()
        t.close(grace_s=0.2)


def test_malformed_and_replayed_secagg_messages_are_refused_and_the_round_carries_on(tokens, learner):
    """Four raw clients run the protocol by hand.  A message for another round, unparsable
    bytes, a duplicate masked input and a replayed key-share message are refused with their
    reasons; a client whose masked input has the wrong length is refused and dropped; the
    sum of the three others is still exact."""
    t = GrpcTransport("127.0.0.1:0", tokens=tokens, spec=learner.spec, secagg=True, heartbeat_interval_s=0.5, max_round_s=20.0)
    names = ["a", "b", "c", "d"]
    raws = {n: RawClient(t.address, tokens.add(n)) for n in names}
    try:
        cid = _start_round(t, raws, learner)
        dim = learner.spec.dim
        runner, result = _secure_sum_thread(t, cid.values(), SecureAggregation(clip_range=1.0, max_clients=4, modulus_bits=32))
        rng = np.random.default_rng(1)
        rows = {n: rng.integers(0, 1 << 32, size=dim, dtype=np.uint64) for n in names}
        errors: list = []
        dup_done = threading.Event()
        refused: dict = {}

        def party(n: str) -> None:
            try:
                c, me = raws[n], SecAggClient(cid[n], consistency=True)
                adv = wire.advertise_to_pb(me.advertise_keys())
                if n == "a":
                    _expect_refusal(refused, "wrong_round", lambda: _call(c, round=7, advertise=adv))
                    _expect_refusal(refused, "unparsable", lambda: c.raw_unary("SecAggStep", b"\xff\x01garbage"))
                directory = wire.directory_from_pb(_call(c, advertise=adv).directory, dim + 1)
                shares = wire.share_keys_to_pb(me.share_keys(directory))
                fwd = wire.forwarded_from_pb(cid[n], _call(c, share_keys=shares).forwarded)
                masked = wire.masked_to_pb(me.masked_input(fwd, rows[n]))
                if n == "c":  # a masked input of the wrong length: refused, and c is out of the round
                    _expect_refusal(refused, "wrong_length", lambda: _call(c, masked_input=pb.SecAggMaskedInput(masked=masked.masked[:-4])))
                    return
                if n == "d":
                    dup_done.wait(20)
                if n == "b":
                    first = c.stub.SecAggStep.future(pb.SecAggRequest(client_id=c.client_id, session=c.session, round=1, masked_input=masked),
                                                     metadata=c.metadata, timeout=30)
                    time.sleep(0.3)
                    _expect_refusal(refused, "duplicate", lambda: _call(c, masked_input=masked))
                    dup_done.set()
                    req = wire.survivors_from_pb(first.result().consistency_request)
                    _expect_refusal(refused, "replay", lambda: _call(c, share_keys=shares))  # stage 1 is over
                else:
                    req = wire.survivors_from_pb(_call(c, masked_input=masked).consistency_request)
                ur = _call(c, consistency=wire.signature_to_pb(me.consistency_check(req))).unmask_request
                sigs = {int(b.client_id): bytes(b.data) for b in ur.signatures}
                done = _call(c, unmask=wire.unmask_to_pb(me.unmask(wire.survivors_from_pb(ur.survivors), sigs)))
                assert done.done.survivors == 3
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)

        _run_parties(party, names, runner, errors)
        res = result["sum"]
        assert res.survivors == tuple(sorted(cid[n] for n in "abd")) and res.dropped == (cid["c"],)
        plain = (rows["a"] + rows["b"] + rows["d"]) & np.uint64(0xFFFFFFFF)
        assert np.array_equal(res.sum, plain)
        assert refused["wrong_round"][0] == grpc.StatusCode.FAILED_PRECONDITION and "no round 7" in refused["wrong_round"][1]
        assert refused["unparsable"][0] == grpc.StatusCode.INVALID_ARGUMENT and "cannot parse SecAggRequest" in refused["unparsable"][1]
        assert refused["wrong_length"][0] == grpc.StatusCode.INVALID_ARGUMENT and f"{dim * 4}" in refused["wrong_length"][1]
        assert refused["duplicate"][0] == grpc.StatusCode.FAILED_PRECONDITION and "already sent" in refused["duplicate"][1]
        assert refused["replay"][0] == grpc.StatusCode.FAILED_PRECONDITION and "is over" in refused["replay"][1]
        counts = t.refusals_total()
        assert counts == {"wrong_round": 1, "malformed": 2, "duplicate": 1, "replay": 1}, counts
        m = res.measurements
        assert m["secagg_stage_bytes"]["masked_input"] >= 3 * dim * 4 and m["secagg_survivors"] == 3
    finally:
        for c in raws.values():
            c.close()
        t.close(grace_s=0.2)


def test_too_few_secagg_survivors_fail_the_aggregation_cleanly(tokens, learner):
    """Two of four clients stop heartbeating before key advertisement: with threshold 3
    the protocol cannot complete, `secure_sum` raises, and SecureAggregation turns it into
    the ValueError that fails the round with the model unchanged."""
    t = GrpcTransport("127.0.0.1:0", tokens=tokens, spec=learner.spec, secagg=True, heartbeat_interval_s=0.2, max_round_s=20.0)
    raws = {n: RawClient(t.address, tokens.add(n)) for n in "abcd"}
    try:
        ids = sorted(_start_round(t, raws, learner, heartbeat_s=0.05).values())
        for n in "cd":
            raws[n].stop_heartbeats()
        secure = SecureAggregation(clip_range=1.0, max_clients=4, threshold=3)
        secure.remote = t.secure_aggregation()
        out: dict = {}

        def adv(n):
            c = raws[n]
            try:
                c.stub.SecAggStep(pb.SecAggRequest(client_id=c.client_id, session=c.session, round=1,
                                                   advertise=wire.advertise_to_pb(SecAggClient(c.client_id, consistency=True).advertise_keys())),
                                  metadata=c.metadata, timeout=30)
            except grpc.RpcError as err:
                out[n] = err.details()

        threads = [threading.Thread(target=adv, args=(n,), daemon=True) for n in "ab"]
        for th in threads:
            th.start()
        with pytest.raises(ValueError, match="secure aggregation failed: secure aggregation needs at least 3 clients"):
            secure.aggregate(torch.zeros(4, learner.spec.dim), np.ones(4), round=1, client_ids=ids)
        for th in threads:
            th.join(10)
        assert set(out) == {"a", "b"} and all("failed" in d for d in out.values())  # the waiting clients hear it
    finally:
        for c in raws.values():
            c.close()
        t.close(grace_s=0.2)


def test_secagg_plus_over_grpc_sends_each_client_only_its_neighbourhood_and_drops_a_forged_signature(tokens, learner):
    """SecAgg+ (degree 4, 8 clients) through the real server: each client's key directory lists
    itself and its 4 neighbours, and nothing it receives in any stage holds a non-neighbour's
    public key.  A client whose consistency signature to a neighbour is forged is refused
    (`malformed`, naming both) and takes no further part; its masked row still counts, its
    self mask rebuilt from its neighbours' shares, and the sum of the 8 rows is exact."""
    from fleetlearn.privacy.secagg import derive_neighborhood

    n, k, forger = 8, 4, "p3"
    t = GrpcTransport("127.0.0.1:0", tokens=tokens, spec=learner.spec, secagg=True, heartbeat_interval_s=0.5, max_round_s=20.0)
    names = [f"p{i}" for i in range(n)]
    raws = {nm: RawClient(t.address, tokens.add(nm)) for nm in names}
    try:
        cid = _start_round(t, raws, learner)
        dim = learner.spec.dim
        runner, result = _secure_sum_thread(t, cid.values(), SecureAggregation(clip_range=1.0, max_clients=n, modulus_bits=32, neighbors=k))
        rng = np.random.default_rng(2)
        rows = {nm: rng.integers(0, 1 << 32, size=dim, dtype=np.uint64) for nm in names}
        keys: dict = {}  # client -> its three public keys
        received: dict = {nm: [] for nm in names}  # every reply a client got, serialized
        neighbours: dict = {}
        errors: list = []
        refused: dict = {}

        def party(nm: str) -> None:
            try:
                c, me = raws[nm], SecAggClient(cid[nm], consistency=True)
                adv = me.advertise_keys()
                keys[cid[nm]] = (adv.cipher_public_key, adv.mask_public_key, adv.signing_public_key)

                def step(**body):
                    reply = _call(c, **body)
                    received[nm].append(reply.SerializeToString())
                    return reply

                got = step(advertise=wire.advertise_to_pb(adv)).directory
                assert (got.degree, got.size, len(got.peers)) == (k, n, k + 1)
                directory = wire.directory_from_pb(got, dim + 1)
                neighbours[nm] = derive_neighborhood(directory, cid[nm])[0]
                fwd = wire.forwarded_from_pb(cid[nm], step(share_keys=wire.share_keys_to_pb(me.share_keys(directory))).forwarded)
                req = wire.survivors_from_pb(step(masked_input=wire.masked_to_pb(me.masked_input(fwd, rows[nm]))).consistency_request)
                sig = me.consistency_check(req)
                assert set(sig.neighbor_signatures) == set(neighbours[nm]) and not sig.signature
                if nm == forger:
                    to = min(sig.neighbor_signatures)
                    forged = dataclasses.replace(sig, neighbor_signatures={**sig.neighbor_signatures, to: bytes(64)})
                    _expect_refusal(refused, f"forged to {to}", lambda: step(consistency=wire.signature_to_pb(forged)))
                    return
                ur = step(consistency=wire.signature_to_pb(sig)).unmask_request
                sigs = {int(b.client_id): bytes(b.data) for b in ur.signatures}
                assert set(sigs) == set(neighbours[nm]) - {cid[forger]}  # its neighbours' signatures to it, and no others
                done = step(unmask=wire.unmask_to_pb(me.unmask(wire.survivors_from_pb(ur.survivors), sigs)))
                assert done.done.survivors == n
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)

        _run_parties(party, names, runner, errors)
        (key, (code, details)), = refused.items()
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert f"consistency signature of client {cid[forger]} to client {key.split()[-1]} does not verify" in details
        assert t.refusals_total() == {"malformed": 1}
        res = result["sum"]
        assert res.survivors == tuple(sorted(cid.values())) and res.dropped == ()  # the forger's masked row counts
        assert np.array_equal(res.sum, Quantizer.field_sum(np.stack(list(rows.values())), 32))
        for nm in names:
            blob = b"".join(received[nm])
            near = {cid[nm], *neighbours[nm]}
            assert len(near) == k + 1
            assert all(key in blob for u in near for key in keys[u])  # the check below is not vacuous
            assert not any(key in blob for u in set(cid.values()) - near for key in keys[u]), f"{nm} received a non-neighbour's key"
    finally:
        for c in raws.values():
            c.close()
        t.close(grace_s=0.2)


def test_a_client_refuses_a_key_directory_beyond_its_neighbourhood():
    """A directory is bounded by what the client needs (all pairs: |U1| clients; SecAgg+: itself
    and k neighbours), before anything is allocated for it."""
    from fleetlearn.privacy.secagg import SecAggError

    def peer(i):
        return pb.SecAggPeerKeys(client_id=i, cipher_public_key=bytes([i]) * 32, mask_public_key=bytes([i + 64]) * 32,
                                 signing_public_key=bytes([i + 128]) * 32, point=i + 1)

    m = pb.SecAggKeyDirectory(session=b"s" * 16, threshold=3, modulus_bits=32, dim=10, peers=[peer(i) for i in range(6)], degree=4, size=8)
    with pytest.raises(SecAggError, match="lists 6 clients; a client of a round of 8 with graph degree 4 needs at most 5"):
        wire.directory_from_pb(m, 10)
    m.size = 5
    with pytest.raises(SecAggError, match="a degree below size - 1"):
        wire.directory_from_pb(m, 10)
    m.size, m.degree = 6, 0  # all pairs: all six
    assert sorted(wire.directory_from_pb(m, 10).points.values()) == list(range(1, 7))


# -- a count-sketch uplink under SecAgg over gRPC: the clients mask their sketch tables -----------------
SKETCH_CONFIG = """
seed = 4
[data]
dataset = "digits"
clients = 4
partition = "iid"
[model]
hidden = [16]
[client]
local_epochs = 1
batch_size = 16
lr = 0.1
[server]
rounds = 2
cohort = 4
deadline_s = 60.0
[compression]
uplink = "sketch:100,cols=150,rows=5"
[privacy]
secure_aggregation = true
secagg_clip_range = 4.0
[monitoring]
detectors = []
"""


@pytest.mark.slow
def test_a_sketch_uplink_under_secagg_over_grpc_masks_each_clients_table(tmp_path, monkeypatch):
    """FetchSGD's sketches are linear, so secure aggregation sums the clients' sketch tables
    (rows x cols entries, not the model's d): the unmasked sum is exactly the plain sum of
    the quantized tables, the server receives no table, and the model moves on the k heavy
    hitters of the unsketched mean."""
    from fleetlearn.cli import main
    from fleetlearn.compression import parse_chain
    from fleetlearn.ops import RunStore
    from fleetlearn.transport.grpc import commands

    fleet_py = Path(__file__).with_name("grpc_fleet_process.py")
    cfg = tmp_path / "run.toml"
    cfg.write_text(SKETCH_CONFIG)
    commands.certs(tmp_path / "certs")
    toks = {i: commands.token_add(tmp_path / "state", f"site-{i}") for i in range(4)}
    dump, inputs = tmp_path / "server-received", tmp_path / "client-rows"
    monkeypatch.setenv(wire.DUMP_ENV, str(dump))
    port = _free_port()
    fleet = subprocess.Popen([sys.executable, str(fleet_py), f"127.0.0.1:{port}", str(cfg), str(tmp_path / "certs" / "ca.pem"),
                              *(f"{i}:{t}" for i, t in toks.items())], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=tmp_path, env={**os.environ, wire.INPUT_DUMP_ENV: str(inputs)})
    try:
        code = main(["server", str(cfg), "--listen", f"127.0.0.1:{port}", "--state", str(tmp_path / "state"), "--certs",
                     str(tmp_path / "certs"), "--min-clients", "4", "--wait-s", "120", "--runs-dir", str(tmp_path / "runs"), "--json"])
        out, err = fleet.communicate(timeout=180)
    finally:
        if fleet.poll() is None:
            fleet.kill()
    assert code == 0 and fleet.returncode == 0, err[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    store = RunStore.open(run_dir)
    recs = store.records()
    assert [r.status for r in recs] == ["ok", "ok"] and all(r.accepted == 4 for r in recs), [r.reason for r in recs]
    width = parse_chain("sketch:100,cols=150,rows=5").summand_width(1210)
    assert width == 750
    for r in (1, 2):
        (f,) = dump.glob(f"r{r}-sum-*.bin")
        got = json.loads(f.read_bytes())
        rows = [np.load(inputs / f"r{r}-c{c}.npy") for c in got["survivors"]]
        assert len(rows) == 4 and all(row.shape == (width,) for row in rows)  # each client masked its table
        mask = (1 << got["modulus_bits"]) - 1
        plain = np.sum(np.stack(rows), axis=0, dtype=np.uint64) & np.uint64(mask)
        assert np.array_equal(np.asarray(got["sum"], dtype=np.uint64), plain)
    assert all(f.stat().st_size < 200 for f in dump.glob("r*-update-*.bin"))  # updates carry no table
    # The released model moved on at most k coordinates per round (the unsketched heavy hitters).
    versions = sorted(int(row["version"]) for row in store.checkpoint_rows())
    first, second = (store.load_checkpoint(v)[1] for v in versions[-2:])
    moved = int((second - first != 0).sum())
    assert 0 < moved <= 100
