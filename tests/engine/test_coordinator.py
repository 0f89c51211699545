import dataclasses
import math

import numpy as np
import pytest
import torch

import fleetlearn
from fleetlearn.config import load_config
from fleetlearn.devices import DeviceProfile, Fleet
from fleetlearn.engine import build_coordinator
from fleetlearn.transport import client_seed

SMALL = {"data": {"clients": 20}, "server": {"rounds": 2, "cohort": 5}, "client": {"local_epochs": 1}}


def small(**over):
    cfg = {k: dict(v) for k, v in SMALL.items()}
    for key, val in over.items():
        sec, _, name = key.partition("__")
        cfg.setdefault(sec, {})[name] = val
    return load_config(cfg)


def test_fedavg_aggregate_equals_independent_weighted_mean():
    c = build_coordinator(small(), store=False)
    start = c.params.clone()
    rec = c.run_round()
    t = c.transport
    ids = [cr.client_id for cr in rec.clients]
    deltas, sizes = [], []
    for cid in ids:
        res = c.learner.fit(start, t.client_data(cid), c.fit_config(), client_seed(c.config.seed, 1, cid))
        deltas.append(res.delta)
        sizes.append(res.num_examples)
    w = torch.tensor(sizes, dtype=torch.float32)
    expected = start + (w[:, None] * torch.stack(deltas)).sum(0) / w.sum()
    assert torch.allclose(c.params, expected, atol=1e-5)
    assert rec.version == 1 and rec.accepted == 5 and rec.status == "ok"
    assert math.isclose(sum(cr.weight for cr in rec.clients), 1.0, rel_tol=1e-9)


def test_example_claims_are_capped():
    c = build_coordinator(small(), store=False)
    w = c.example_weights([10, 12, 11, 10, 10_000_000])
    assert list(w) == [10, 12, 11, 10, 4 * 11]  # a cohort of 5: capped at 5 - 1 = 4 x the cohort median
    c.config.server.max_examples = 11
    assert list(c.example_weights([10, 12, 11, 10, 10_000_000])) == [10, 11, 11, 10, 11]


def test_same_seed_same_model_other_seed_other_model():
    a = build_coordinator(small(), store=False)
    b = build_coordinator(small(), store=False)
    d = build_coordinator(load_config({**SMALL, "seed": 1}), store=False)
    for _ in range(2):
        a.run_round(); b.run_round(); d.run_round()
    assert torch.equal(a.params, b.params)
    assert not torch.equal(a.params, d.params)


def test_vectorised_and_sequential_engines_agree():
    a = build_coordinator(small(engine__vectorize=True), store=False)
    b = build_coordinator(small(engine__vectorize=False), store=False)
    a.run_round(); b.run_round()
    assert torch.allclose(a.params, b.params, atol=1e-5)


def _fleet(n, slow=None, factor=10.0):
    base = DeviceProfile(compute_sps=1000.0, uplink_mbps=8.0, downlink_mbps=16.0, latency_s=0.02)
    profiles = [base] * n
    if slow is not None:
        profiles = list(profiles)
        profiles[slow] = dataclasses.replace(base, compute_sps=base.compute_sps / factor, uplink_mbps=base.uplink_mbps / factor, downlink_mbps=base.downlink_mbps / factor)
    return Fleet.from_profiles(profiles)


def test_round_time_is_the_closed_form_sum():
    c = build_coordinator(small(server__cohort=20), store=False)
    c.transport.fleet = _fleet(20)
    rec = c.run_round()
    d = c.learner.spec.dim
    down = up = len(c.uplink.encode(torch.zeros(d))[0])  # the identity codec: a small header + float32
    assert 4 * d < up < 4 * d + 64
    for cr in rec.clients:
        samples = cr.steps and c.transport.data.train_sizes()[cr.client_id] * c.config.client.local_epochs
        expected = 0.02 + down * 8 / 16e6 + samples / 1000.0 + 0.02 + up * 8 / 8e6
        assert math.isclose(cr.arrival_s, expected, rel_tol=1e-9)
        assert cr.uplink_bytes == up and cr.downlink_bytes == down
    assert math.isclose(rec.sim_seconds, max(cr.arrival_s for cr in rec.clients), rel_tol=1e-12)
    assert math.isclose(c.clock.now, rec.sim_seconds)


def test_one_slow_client_sets_the_round_time():
    c = build_coordinator(small(server__cohort=20), store=False)
    c.transport.fleet = _fleet(20, slow=7)
    rec = c.run_round()
    slowest = max(rec.clients, key=lambda cr: cr.arrival_s)
    assert slowest.client_id == 7
    others = max(cr.arrival_s for cr in rec.clients if cr.client_id != 7)
    assert rec.sim_seconds == slowest.arrival_s and rec.sim_seconds > 5 * others


class Corrupting:
    """Wraps the real simulation transport and damages chosen clients' payloads."""

    def __init__(self, inner, damage):
        self.inner, self.damage = inner, damage
        self.name = "corrupting"

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def dispatch(self, task, cohort):
        for reply in self.inner.dispatch(task, cohort):
            m = reply.message
            fn = self.damage.get(m.client_id)
            yield dataclasses.replace(reply, message=fn(m)) if fn else reply


def test_bad_updates_are_refused_with_reasons_and_the_round_goes_on():
    c = build_coordinator(small(server__cohort=20), store=False)
    nan = torch.full((c.learner.spec.dim,), float("nan"))
    # A malicious client bypasses the encoder's own NaN check: a well-formed payload of NaNs.
    payload_nan = c.uplink._encode_plain(nan, None)
    damage = {
        0: lambda u: dataclasses.replace(u, payload=u.payload[:-3]),
        1: lambda u: dataclasses.replace(u, payload=payload_nan),
        2: lambda u: dataclasses.replace(u, base_version=u.base_version - 1),
        3: lambda u: dataclasses.replace(u, round=u.round + 5),
        4: lambda u: dataclasses.replace(u, num_examples=0),
    }
    c.transport = Corrupting(c.transport, damage)
    rec = c.run_round()
    reasons = {cr.client_id: cr.reason for cr in rec.clients if cr.status == "rejected"}
    assert set(reasons) == {0, 1, 2, 3, 4}
    assert reasons[0].startswith("payload:") and ("corrupted" in reasons[0] or "bytes" in reasons[0])
    assert "non-finite" in reasons[1]
    assert "stale" in reasons[2]
    assert "wrong round" in reasons[3]
    assert "example count" in reasons[4]
    assert rec.rejected == 5 and rec.accepted == 15 and rec.status == "ok"
    assert torch.isfinite(c.params).all()


def test_round_with_no_accepted_update_fails_and_keeps_the_model():
    c = build_coordinator(small(), store=False)
    c.transport = Corrupting(c.transport, {i: (lambda u: dataclasses.replace(u, payload=b"junk")) for i in range(20)})
    before = c.params.clone()
    rec = c.run_round()
    assert rec.status == "failed" and rec.version == 0 and c.version == 0
    assert torch.equal(c.params, before)
    rec2 = c.run_round()  # the run goes on
    assert rec2.round == 2


def test_api_run_returns_summary_with_records(tmp_path):
    s = fleetlearn.run({**SMALL, "store": {"root": str(tmp_path)}})
    assert s.rounds == 2 and len(s.records) == 2
    assert s.uplink_bytes == sum(r.uplink_bytes for r in s.records) > 0
    assert s.best_accuracy >= s.final_accuracy - 1e-12 or math.isnan(s.final_accuracy)
    assert (tmp_path / s.run_id / "run.db").is_file()
    assert 0.99 < s.compression_ratio <= 1.0


def test_iid_fedavg_on_digits_reaches_092_in_20_rounds():
    s = fleetlearn.run({"data": {"partition": "iid", "clients": 100}, "server": {"rounds": 20}}, store=False)
    assert s.final_accuracy >= 0.92, [round(r.accuracy, 3) for r in s.records]


def test_default_job_reaches_090():
    s = fleetlearn.run(None, store=False)
    assert s.final_accuracy >= 0.90, [round(r.accuracy, 3) for r in s.records]


def test_synthetic_11_is_harder_than_synthetic_00():
    """Same budget, same seeds: Synthetic(1,1) ends with lower accuracy and higher loss
    than Synthetic(0,0) (FedProx, Li et al. 2020, Fig. 2).  Deterministic under the seeds."""
    def run(a, b):
        accs, losses = [], []
        for seed in range(4):
            s = fleetlearn.run({
                "seed": seed,
                "data": {"dataset": "synthetic", "partition": "natural", "synthetic_alpha": a, "synthetic_beta": b},
                "model": {"name": "logistic"},
                "server": {"rounds": 10, "cohort": 10},
                # 20 local steps, not an epoch: under the power-law client sizes an epoch of the
                # largest client in a cohort took up to 700 steps (25 s for this test); with a
                # fixed budget the gap is 12 pp / 0.15 (an epoch: 4 pp / 0.15) in a quarter of the time.
                "client": {"local_steps": 20, "batch_size": 10, "lr": 0.01, "momentum": 0.0},
                "monitoring": {"detectors": []},
            }, store=False)
            accs.append(s.final_accuracy)
            losses.append(s.final_loss)
        return float(np.mean(accs)), float(np.mean(losses))
    (easy_acc, easy_loss), (hard_acc, hard_loss) = run(0.0, 0.0), run(1.0, 1.0)
    assert hard_acc < easy_acc - 0.01 and hard_loss > easy_loss + 0.05, (easy_acc, hard_acc, easy_loss, hard_loss)


def test_mifa_averages_the_latest_update_of_every_client_seen():
    c = build_coordinator(load_config({**SMALL, "server": {"rounds": 3, "cohort": 5, "aggregator": "mifa"}}), store=False)
    c.run_round()
    first = set(c.aggregator.stored_clients())
    c.run_round()
    seen = {cr.client_id for r in c.records for cr in r.clients if cr.status == "accepted"}
    assert set(c.aggregator.stored_clients()) == seen and first <= seen
    assert c.records[-1].status == "ok" and torch.isfinite(c.params).all()
