"""The label-skew helpers over gRPC: oversampling (the client rebalances its own rows)
and label histograms for `label_importance` weighting (checked by the server)."""

from __future__ import annotations

import grpc
import pytest
import torch
from grpc_raw_client import RawClient
from grpc_test_support import CLASSES, ClientThreads, DispatchThread, make_task, tiny_data

from fleetlearn.client import Device
from fleetlearn.compression import parse_chain
from fleetlearn.messages import Update
from fleetlearn.transport import client_seed


def test_clients_oversample_and_report_their_label_histogram(transport, tokens, learner):
    toks = tokens.add_many(["a", "b"])
    data = {tokens.client_id(n): tiny_data(10 + i, n=40) for i, n in enumerate(toks)}
    clients = ClientThreads(transport.address, toks, tokens, learner, data)
    assert sorted(transport.wait_available(2, timeout_s=10)) == sorted(data)
    params = learner.init_params(0)
    task = make_task(1, 0, params, deadline_s=10.0, oversample={"noise_std": 0.0}, label_histogram={"classes": CLASSES})
    replies = list(transport.dispatch(task, sorted(data)))
    hp = task.spec.fit
    assert len(replies) == 2
    for r in replies:
        u = r.message
        assert isinstance(u, Update)
        own = data[u.client_id]
        assert list(u.metrics.label_counts) == torch.bincount(own.y, minlength=CLASSES).tolist()
        rebalanced = Device(learner, parse_chain("none"), parse_chain("none")).oversampled(own, task, u.client_id)
        assert rebalanced.num_examples > own.num_examples  # tiny_data's classes are unbalanced
        assert u.metrics.oversampled == rebalanced.num_examples - own.num_examples
        assert u.num_examples == own.num_examples  # the original count, not the rebalanced one
        expect = learner.fit(params, rebalanced, hp, client_seed(7, 1, u.client_id))
        assert torch.equal(parse_chain("none").decode(u.payload), expect.delta)
    transport.finish()
    clients.join()
    assert transport.refusals_total() == {}, list(transport.server.refusals.log)  # (time, round, client, reason, detail)


@pytest.mark.parametrize("counts, why", [([5, 5], "has 2 classes"), ([3, 3, 3], "summing to 9"), (None, "has 0 classes")])
def test_a_bad_label_histogram_is_refused_and_a_good_one_accepted(transport, tokens, learner, counts, why):
    c = RawClient(transport.address, tokens.add("raw"))
    try:
        c.register(learner.spec.digest())
        c.start_heartbeats()
        params = learner.init_params(0)
        d = DispatchThread(transport, make_task(1, 0, params, label_histogram={"classes": 3}), [c.client_id])
        c.pull()
        payload, _ = parse_chain("none").encode(torch.zeros(params.numel()))
        metrics = dict(loss_before=1.0, loss_after=0.5, accuracy=0.5, compute_seconds=0.01, steps=1, samples=10)
        from fleetlearn.transport.grpc import fleetlearn_pb2 as pb

        bad = pb.ClientMetrics(**metrics, label_counts=counts or [])
        with pytest.raises(grpc.RpcError) as err:
            c.push(1, 0, payload, num_examples=10, metrics=bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and why in err.value.details()
        good = pb.ClientMetrics(**metrics, label_counts=[2, 3, 5])
        assert c.push(1, 0, payload, num_examples=10, metrics=good).accepted
        (reply,) = d.join()
        assert reply.message.metrics.label_counts == (2, 3, 5)
    finally:
        c.stop_heartbeats()
        c.close()
