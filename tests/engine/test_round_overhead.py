"""What issue 19's overhead work changed in the round, checked for what it must keep:

- the intake judges a batch of replies as matrix operations with the outcome of taking
  them one at a time (statuses, reasons, acceptance order, the cohort filled);
- the background commit keeps round r committed before round r + 1's commit and before
  the run returns, surfaces a failed commit as the run's error and never leaves a partial
  round;
- the phase timers are there on every round (what they measure is for benchmarks, never
  asserted here: no timed tests);
- the simulation's per-cohort seeds and data gathers are the per-client ones.
"""

from __future__ import annotations

import math
import threading
import time

import pytest
import torch

from fleetlearn.compression import CodecChain, parse_chain
from fleetlearn.config import load_config
from fleetlearn.engine import build_coordinator
from fleetlearn.engine.intake import Intake, UpdateDecoder, client_record, stacked
from fleetlearn.learners import CohortData, cohort_rows, cohort_sizes
from fleetlearn.messages import ClientMetrics, Update
from fleetlearn.ops import StoreError
from fleetlearn.transport.simulation import client_seed, client_seeds
from fleetlearn.validation import NormBoundValidator, ValidationContext, build_validators

SMALL = {"data": {"clients": 20}, "server": {"rounds": 4, "cohort": 6}, "client": {"local_epochs": 1}}
DIM = 5
METRICS = ClientMetrics(1.0, 0.5, 0.9, 0.1, 3, 30)


def _update(cid, payload, round=2, version=1, examples=10):
    return Update(cid, round, version, payload, "none", examples, METRICS, 0)


def _payload(vec):
    return CodecChain().encode(torch.as_tensor(vec, dtype=torch.float32))[0]


def _replies():
    """A batch with every kind of refusal, and clients out of id order."""
    good = [float(i) for i in range(DIM)]
    nan = bytearray(_payload([1.0] * DIM))
    nan[-8:-4] = b"\x00\x00\xc0\x7f"  # the last value becomes NaN: the CRC then fails too
    return [
        _update(9, _payload(good)),
        _update(3, _payload([0.5] * DIM)),
        _update(4, _payload([1.0] * (DIM + 1))),  # another dimension
        _update(5, bytes(nan)),  # corrupted
        _update(6, _payload([100.0] * DIM)),  # above the norm bound
        _update(3, _payload([0.25] * DIM)),  # a duplicate of client 3
        _update(7, _payload(good), round=1),  # another round
        _update(8, _payload(good), examples=0),  # a bad claim
        _update(1, _payload([2.0] * DIM)),
    ]


def _intake():
    validators = build_validators(max_norm=50.0)
    assert any(isinstance(v, NormBoundValidator) for v in validators)
    return Intake(UpdateDecoder(CodecChain(), DIM), validators)


def _ctx():
    return ValidationContext(round=2, version=1, dim=DIM)


def test_a_batch_is_judged_as_one_update_at_a_time():
    msgs = _replies()
    one_recs = [client_record(m, 0.0) for m in msgs]
    ctx = _ctx()
    one = [_intake().accept(m, r, ctx) for m, r in zip(msgs, one_recs)]
    batch_recs = [client_record(m, 0.0) for m in msgs]
    batch = _intake().accept_many(msgs, batch_recs, _ctx())
    assert [(r.status, r.reason) for r in batch_recs] == [(r.status, r.reason) for r in one_recs]
    assert [r.status for r in batch_recs] == ["accepted", "accepted"] + ["rejected"] * 6 + ["accepted"]
    assert batch_recs[5].reason.startswith("duplicate:") and batch_recs[3].reason.startswith("payload:")
    assert batch_recs[4].reason.startswith("norm:") and batch_recs[2].reason.startswith("payload:")
    for a, b in zip(one, batch):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)
    assert [r.update_norm for r in batch_recs if r.status == "accepted"] == pytest.approx(
        [r.update_norm for r in one_recs if r.status == "accepted"], rel=1e-6)


def test_a_batch_stops_where_the_cohort_is_filled():
    msgs = _replies()
    recs = [client_record(m, 0.0) for m in msgs]
    out = _intake().accept_many(msgs, recs, _ctx(), need=2)
    assert len(out) == 2 and all(v is not None for v in out)  # the first two are accepted: nothing after is looked at
    assert [r.status for r in recs[2:]] == ["accepted"] * 7  # untouched (collect marks them late)


def test_accepted_rows_in_client_order_are_the_batch_matrix_itself():
    msgs = [_update(c, _payload([float(c)] * DIM)) for c in (5, 2, 7)]
    vecs = _intake().accept_many(msgs, [client_record(m, 0.0) for m in msgs], _ctx())
    by_id = [vecs[i] for i in (1, 0, 2)]  # client ids 2, 5, 7: the matrix's rows
    m = stacked(by_id)
    assert torch.equal(m, torch.tensor([[2.0] * DIM, [5.0] * DIM, [7.0] * DIM]))
    assert m.data_ptr() == by_id[0].data_ptr()  # no copy
    other = stacked([by_id[2], by_id[0]])  # not consecutive rows: a copy, still right
    assert torch.equal(other, torch.tensor([[7.0] * DIM, [2.0] * DIM]))


def test_over_selection_marks_the_rest_not_needed_as_before():
    cfg = load_config({**SMALL, "server": {"rounds": 1, "cohort": 4, "over_selection": 1.5}})
    rec = build_coordinator(cfg, store=False).run_round()
    assert rec.selected == 6 and rec.accepted == 4 and rec.late == 2
    late = [c for c in rec.clients if c.status == "late"]
    assert all(c.reason.startswith("not needed: the cohort of 4 was filled at") for c in late)
    accepted = [c for c in rec.clients if c.status == "accepted"]
    assert max(c.arrival_s for c in accepted) <= min(c.arrival_s for c in late)  # the first 4 to arrive were taken


def test_every_round_records_its_phases_and_the_log_has_the_commit(tmp_path):
    cfg = load_config({**SMALL, "store": {"root": str(tmp_path)}})
    c = build_coordinator(cfg)
    s = c.run()
    for r in s.records:
        ph = r.extra["phases"]
        assert {"select", "train", "encode", "intake", "aggregate", "evaluate", "measure", "hooks"} <= set(ph)
        assert all(v >= 0 for v in ph.values())
    assert len(c.phase_log) == 4 and all("commit" in p for p in c.phase_log)
    assert [r.extra["phases"] for r in c.store.records()] == [r.extra["phases"] for r in s.records]


def _slow_commits(store, delay, log):
    inner = store.commit_round

    def commit_round(record, *a, **k):
        log.append(("start", record.round, threading.current_thread().name))
        time.sleep(delay)
        inner(record, *a, **k)
        log.append(("done", record.round, threading.current_thread().name))

    store.commit_round = commit_round


def test_background_commits_run_in_order_and_all_land_before_the_run_returns(tmp_path):
    cfg = load_config({**SMALL, "store": {"root": str(tmp_path)}})
    c = build_coordinator(cfg)
    log: list = []
    _slow_commits(c.store, 0.05, log)
    s = c.run()
    assert [e[:2] for e in log] == [(k, r) for r in range(1, 5) for k in ("start", "done")]  # r done before r + 1 starts
    assert {e[2] for e in log} == {"fleetlearn-commit"}  # off the round's thread
    assert [r.round for r in c.store.records()] == [1, 2, 3, 4] and s.rounds == 4
    assert c.store.load_checkpoint()[0] == s.records[-1].version


def test_a_failed_background_commit_fails_the_run_and_leaves_whole_rounds(tmp_path):
    cfg = load_config({**SMALL, "store": {"root": str(tmp_path)}})
    c = build_coordinator(cfg)
    inner = c.store.commit_round

    def commit_round(record, *a, **k):
        if record.round == 2:
            raise StoreError("disk full (test)")
        inner(record, *a, **k)

    c.store.commit_round = commit_round
    with pytest.raises(StoreError, match="disk full"):
        c.run()
    assert [r.round for r in c.store.records()] == [1]  # round 2 wrote nothing, and nothing after it was committed
    assert c.round <= 3  # the error surfaced at the next commit at the latest


def test_the_commit_can_stay_on_the_rounds_path(tmp_path):
    cfg = load_config({**SMALL, "store": {"root": str(tmp_path), "background_commit": False}})
    c = build_coordinator(cfg)
    log: list = []
    _slow_commits(c.store, 0.0, log)
    c.run()
    assert {e[2] for e in log} == {threading.current_thread().name}
    assert [r.round for r in c.store.records()] == [1, 2, 3, 4]


def test_cohort_seeds_and_data_are_the_per_client_ones():
    assert client_seeds(7, 3, [5, 1, 5]) == [client_seed(7, 3, 5), client_seed(7, 3, 1), client_seed(7, 3, 5)]
    assert len(set(client_seeds(7, 3, range(1000)))) == 1000
    assert client_seeds(7, 3, [1]) != client_seeds(7, 4, [1]) != client_seeds(8, 3, [1])
    assert all(0 <= s < 2**63 for s in client_seeds(2**40, 2**33, [0, 2**40]))
    c = build_coordinator(load_config({**SMALL, "data": {"clients": 30, "local_test_fraction": 0.2}}), store=False)
    t = c.transport
    ids = [3, 0, 29, 7, 7]
    cohort = t.cohort_data(ids)
    assert len(cohort) == 5
    for got, cid in zip(cohort, ids):
        want = t.client_data(cid)
        for a, b in ((got.x, want.x), (got.y, want.y), (got.x_test, want.x_test), (got.y_test, want.y_test)):
            assert torch.equal(a, b)
    # A slice is the cohort of those clients; the whole tensors are every client's rows in order.
    part = cohort[1:4]
    assert isinstance(part, CohortData) and len(part) == 3
    for got, cid in zip(part, ids[1:4]):
        assert torch.equal(got.x, t.client_data(cid).x) and torch.equal(got.y_test, t.client_data(cid).y_test)
    assert torch.equal(cohort_rows(part, "y"), torch.cat([t.client_data(c).y for c in ids[1:4]]))
    assert cohort_sizes(part).tolist() == [t.client_data(c).num_examples for c in ids[1:4]]
    assert torch.equal(cohort[-1].x, t.client_data(7).x)
    with pytest.raises(IndexError):
        cohort[5]
    assert len(t.cohort_data([])) == 0


def test_the_training_losses_come_from_the_training_pass():
    # One client whose data fits one batch: "before" is the received model's loss on all its
    # data, and with one epoch "after" is that same batch's loss (the last epoch's running mean).
    from fleetlearn.learners import ClientData, FitConfig, TorchLearner, mlp

    learner = TorchLearner(lambda: mlp(6, 3, [8]))
    params = learner.init_params(0)
    g = torch.Generator().manual_seed(1)
    data = ClientData(torch.randn(10, 6, generator=g), torch.randint(0, 3, (10,), generator=g), torch.zeros(0, 6), torch.zeros(0, dtype=torch.int64))
    full = float(learner.per_example(params, data.x, data.y)[0].mean())
    one = learner.fit(params, data, FitConfig(local_epochs=1, batch_size=32, lr=0.1), seed=3)
    assert one.loss_before == pytest.approx(full, rel=1e-5) and one.loss_after == pytest.approx(full, rel=1e-5)
    many = learner.fit(params, data, FitConfig(local_epochs=30, batch_size=32, lr=0.5), seed=3)
    assert many.loss_before == pytest.approx(full, rel=1e-5) and many.loss_after < 0.8 * many.loss_before
    # Two batches an epoch: "after" is the size-weighted mean of the last epoch's two batch losses.
    hp = FitConfig(local_epochs=2, batch_size=6, lr=0.1)
    res = learner.fit(params, data, hp, seed=4)
    from fleetlearn.learners import batch_schedule

    batches = batch_schedule(10, hp, 4)
    assert [len(b) for b in batches] == [6, 4, 6, 4]
    p = params.clone()
    losses = []
    for idx in batches:
        p.requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(learner._logits(p, data.x[idx]), data.y[idx])
        (grad,) = torch.autograd.grad(loss, p)
        losses.append(float(loss.detach()))
        p = (p - 0.1 * grad).detach()
    assert res.loss_before == pytest.approx(losses[0], rel=1e-5)
    assert res.loss_after == pytest.approx((6 * losses[2] + 4 * losses[3]) / 10, rel=1e-5)
    assert torch.allclose(res.delta, p - params, atol=1e-6)
    cut = learner.fit(params, data, hp, seed=4, max_steps=0)
    assert math.isnan(cut.loss_before) and math.isnan(cut.loss_after) and cut.steps == 0


def _nan_payload(at: int) -> bytes:
    """A float32 payload whose value `at` is NaN, with a valid checksum (as a buggy client would send it)."""
    from fleetlearn.compression import wire

    raw = bytearray(_payload([1.0] * DIM))
    start = len(raw) - 4 - 4 * DIM  # values, then the 4-byte checksum trailer
    raw[start + 4 * at: start + 4 * at + 4] = b"\x00\x00\xc0\x7f"
    raw[-4:] = wire.checksum(raw[:-4]).to_bytes(4, "little")
    return bytes(raw)


def test_a_nan_row_is_refused_by_the_batched_finite_check_or_by_the_decoder_without_it():
    msgs = [_update(2, _payload([1.0] * DIM)), _update(4, _nan_payload(3)), _update(6, _payload([2.0] * DIM))]
    intake = _intake()
    assert intake.decoder.check_finite is False  # the finite validator judges the rows: one pass
    recs = [client_record(m, 0.0) for m in msgs]
    out = intake.accept_many(msgs, recs, _ctx())
    assert [r.status for r in recs] == ["accepted", "rejected", "accepted"]
    assert recs[1].reason == "finite: non-finite: 1 NaN/inf values (first at index 3)"
    assert out[1] is None and all(bool(torch.isfinite(v).all()) for v in (out[0], out[2]))
    # Without a finite validator the decoder keeps its own check: a NaN never reaches aggregation.
    bare = Intake(UpdateDecoder(CodecChain(), DIM), [v for v in build_validators() if v.name != "finite"])
    assert bare.decoder.check_finite is True
    recs = [client_record(m, 0.0) for m in msgs]
    bare.accept_many(msgs, recs, _ctx())
    assert recs[1].status == "rejected" and recs[1].reason.startswith("payload:") and "non-finite" in recs[1].reason
    # The batched check reads the row norms the intake measured: a finite row whose float32 norm
    # overflows (values near 1e38) is judged exactly, and accepted; a NaN one is still refused.
    big = [_update(2, _payload([3e38] * DIM)), _update(4, _nan_payload(1))]
    recs = [client_record(m, 0.0) for m in big]
    Intake(UpdateDecoder(CodecChain(), DIM), [v for v in build_validators() if v.name == "finite"]).accept_many(big, recs, _ctx())
    assert recs[0].status == "accepted" and recs[0].update_norm == math.inf
    assert recs[1].status == "rejected" and recs[1].reason.startswith("finite:")


def test_decode_many_gives_each_payload_the_outcome_of_decode_into():
    """The dense float32 rows copied without the per-update pipeline, and every other payload
    (corrupted, truncated, another dimension or format, not bytes, a NaN) through `decode_into`."""
    good = _payload([1.5] * DIM)
    flipped = bytearray(good)
    flipped[20] ^= 0x01  # a value's bit: the checksum fails
    payloads = [
        good, bytes(flipped), good[:-3], _payload([1.0] * (DIM + 1)), bytearray(good), _nan_payload(2),
        CodecChain([]).encode(torch.arange(DIM, dtype=torch.float32))[0], parse_chain("fp16").encode(torch.ones(DIM))[0],
        b"", good + b"\x00", _payload([-2.0] * DIM),
    ]
    msgs = [_update(i, p) for i, p in enumerate(payloads)]
    intake = _intake()
    assert intake.decoder.check_finite is False
    slots = list(range(len(msgs)))[::-1]
    matrix = torch.zeros(len(msgs), DIM)
    vecs, reasons = intake.decoder.decode_many(msgs, matrix, slots)
    for m, s, v, why in zip(msgs, slots, vecs, reasons):
        row = torch.zeros(DIM)
        try:
            want, want_why = intake.decoder.decode_into(m, row), None
        except Exception as exc:
            want, want_why = None, str(exc)
        assert (v is None) == (want is None) and (why is None) == (want_why is None), (m.client_id, why, want_why)
        if v is not None:
            assert v.data_ptr() == matrix[s].data_ptr() and v.numpy().tobytes() == want.numpy().tobytes()
        else:
            assert want_why in why
    assert reasons[0] is None and reasons[4] is None and reasons[5] is None  # a NaN row is the finite validator's business
    assert all(reasons[i] for i in (1, 2, 3, 8, 9))


def test_a_cohort_encoded_at_once_is_each_client_encoded_alone_and_a_nan_delta_is_a_dropout():
    import dataclasses

    from fleetlearn.client.device import Trained
    from fleetlearn.messages import Dropout

    c = build_coordinator(load_config(SMALL), store=False)
    device = c.transport.device
    from fleetlearn.messages import Task

    clients = [3, 5, 8]
    data = c.transport.cohort_data(clients)
    task = Task(round=1, version=0, payload=c.encoded_params(), codec=c.downlink.spec, spec=c.task_spec(clients, None),
                deadline_s=None, control=b"")
    trained = device.train(task, clients, data, [11, 12, 13])
    deltas = torch.stack([r.delta for r in trained.results])
    deltas[1, 4] = float("nan")  # client 5 diverged
    trained = Trained(clients, [dataclasses.replace(r, delta=deltas[i]) for i, r in enumerate(trained.results)], trained.own, trained.added)
    out = device.encode(task, trained)
    assert isinstance(out[1], Dropout) and out[1].reason == "client error: cannot encode a vector with NaN or inf entries"
    for i in (0, 2):
        alone = device.reply(clients[i], task, trained.results[i], labels=trained.own[i].y)
        assert out[i].payload == alone.payload and out[i].metrics == alone.metrics and out[i].client_id == clients[i]
