"""The Ray backend gives the same model as the in-process backend under a seed.

Starts its own local Ray cluster (2 CPUs, no dashboard).  Skipped, with the reason,
where Ray is not installed: pip install "fleetlearn[ray]".
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray", reason='Ray is not installed (pip install "fleetlearn[ray]"); the Ray backend test needs it')

from fleetlearn.config import load_config  # noqa: E402
from fleetlearn.engine.factory import build_coordinator  # noqa: E402
from fleetlearn.transport.ray_backend import RayTransport, split_chunks  # noqa: E402

# Stateful and stochastic uplink (error-feedback residuals + per-client seeds), a flaky
# fleet with a deadline (dropouts, offline devices, late replies): everything the
# driver-side timing and the per-client state shipping have to get right.
CONFIG = {
    "seed": 7,
    "data": {"dataset": "digits", "clients": 30},
    "server": {"rounds": 3, "cohort": 12, "deadline_s": 30.0, "eval_clients": 10},
    "client": {"local_epochs": 2},
    "devices": {"profile": "flaky", "dropout": 0.2},
    "compression": {"uplink": "ef | topk:0.2 | q8:stochastic"},
    "monitoring": {"detectors": []},
}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _run(backend: str, config: dict = CONFIG):
    cfg = load_config({**config, "engine": {"backend": backend, "ray_workers": 2 if backend == "ray" else None}})
    coord = build_coordinator(cfg, store=False)
    try:
        summary = coord.run()
    finally:
        close = getattr(coord.transport, "close", None)
        if close is not None:
            close()
    return coord, summary


@pytest.mark.slow
def test_ray_backend_same_model_as_in_process(local_ray):
    ray_coord, ray_sum = _run("ray")
    sim_coord, sim_sum = _run("simulation")
    assert isinstance(ray_coord.transport, RayTransport)
    assert ray_sum.rounds == sim_sum.rounds == 3
    assert ray_coord.version == sim_coord.version > 0
    torch.testing.assert_close(ray_coord.params, sim_coord.params, rtol=0, atol=1e-6)
    for a, b in zip(ray_sum.records, sim_sum.records):
        # Same clients, same fates, same virtual-clock arrival times and bytes.
        assert [(c.client_id, c.status) for c in a.clients] == [(c.client_id, c.status) for c in b.clients]
        assert a.uplink_bytes == b.uplink_bytes and a.downlink_bytes == b.downlink_bytes
        ta = np.array([c.arrival_s for c in a.clients])
        tb = np.array([c.arrival_s for c in b.clients])
        np.testing.assert_allclose(ta, tb, rtol=0, atol=1e-9)
        assert math.isclose(a.sim_seconds, b.sim_seconds, abs_tol=1e-9)
    assert sum(r.dropped for r in sim_sum.records) > 0  # the flaky fleet did drop someone
    # Per-client codec state came back to the driver, equal to the in-process one.
    ra, sa = ray_coord.transport.device.states, sim_coord.transport.device.states
    assert len(ra) == len(sa) > 0
    for c in sa.clients():
        state, other = sa.get(c), ra.get(c)
        assert other is not None and other.keys() == state.keys()
        for k in state:
            torch.testing.assert_close(other[k], state[k], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_ray_backend_adaptive_pace_same_as_in_process(local_ray):
    # Adaptive rungs are chosen on the driver after training and encoded there.
    config = {**CONFIG, "server": {**CONFIG["server"], "over_selection": 1.3}, "devices": {"profile": "mixed_fleet"},
              "compression": {"adaptive": True, "ladder": ["none", "q8", "ef | topk:0.1 | q8:stochastic"]}}
    ray_coord, ray_sum = _run("ray", config)
    sim_coord, sim_sum = _run("simulation", config)
    torch.testing.assert_close(ray_coord.params, sim_coord.params, rtol=0, atol=1e-6)
    used = set()
    for a, b in zip(ray_sum.records, sim_sum.records):
        assert [(c.client_id, c.status, c.codec, c.uplink_bytes) for c in a.clients] == [(c.client_id, c.status, c.codec, c.uplink_bytes) for c in b.clients]
        used |= {c.codec for c in a.clients}
    assert len(used) > 1  # the policy did pick different rungs


def test_split_chunks_cover_the_cohort_in_order():
    for n in (0, 1, 5, 12, 13):
        for parts in (1, 2, 4, 20):
            chunks = split_chunks(n, parts)
            assert [i for s in chunks for i in range(n)[s]] == list(range(n))
            assert all(s.stop > s.start for s in chunks) and len(chunks) <= max(1, parts)


# Every client-side feature runs through the one client device, so the Ray workers run it
# too: the same model as the in-process simulation, feature by feature.  Within 1e-5, not
# bitwise: each worker trains its chunk of the cohort as one batched (vmapped) computation,
# and a batched product of another batch size may add in another order (float32 rounding);
# the per-client code is the same.
PARITY = {
    "scaffold": {"client": {"local_epochs": 1, "objective": "scaffold"}},
    "fedper": {"personalization": {"method": "fedper"}},
    "ifca": {"server": {"clustering": "ifca", "clusters": 2}},
    "label_skew": {"client": {"local_epochs": 1, "oversample": True}, "server": {"weighting": "label_importance"}},
    "heterofl": {"model": {"hidden": [32], "widths": [1.0, 0.5], "width_rule": "round_robin"}},
    "scaling_attack": {"attack": {"kind": "scaling", "fraction": 0.2}, "server": {"aggregator": "median"}},
    "label_flip": {"attack": {"kind": "label_flip", "fraction": 0.3}},
    "cfl": {"server": {"clustering": "cfl", "clusters": 2}},
    "ditto": {"personalization": {"method": "ditto"}},
    # server-side features whose inputs come from the devices: the same on every backend
    "fedbuff": {"server": {"mode": "async", "concurrency": 4, "buffer_size": 3}},
    "secagg_central_dp": {"privacy": {"mode": "central", "secure_aggregation": True, "noise_multiplier": 0.5,
                                      "clip_norm": 1.0}, "server": {"selector": "poisson"}},
    "local_dp": {"privacy": {"mode": "local", "noise_multiplier": 0.3, "clip_norm": 1.0}},
    "sketch_secagg": {"compression": {"uplink": "sketch:50"}, "privacy": {"secure_aggregation": True}},
    "probes": {"probes": {"clients": 2}},
}


@pytest.mark.slow
@pytest.mark.parametrize("feature", sorted(PARITY))
def test_ray_backend_runs_every_client_feature_like_the_simulation(local_ray, feature):
    base = {"seed": 3, "data": {"dataset": "digits", "clients": 16, "partition": "dirichlet", "alpha": 0.5},
            "server": {"rounds": 2, "cohort": 6, "eval_clients": 4}, "client": {"local_epochs": 1},
            "monitoring": {"detectors": []}}
    config = {k: {**base.get(k, {}), **PARITY[feature].get(k, {})} if isinstance(base.get(k, {}), dict) else base[k]
              for k in {*base, *PARITY[feature]}}
    ray_coord, ray_sum = _run("ray", config)
    sim_coord, sim_sum = _run("simulation", config)
    ray_t, sim_t = (getattr(c.transport, "inner", c.transport) for c in (ray_coord, sim_coord))  # probes wrap it
    assert isinstance(ray_t, RayTransport)
    assert ray_coord.version == sim_coord.version > 0, [r.reason for r in ray_sum.records]
    torch.testing.assert_close(ray_coord.params, sim_coord.params, rtol=0, atol=1e-5)
    for a, b in zip(ray_sum.records, sim_sum.records):
        assert [(c.client_id, c.status, c.uplink_bytes, c.num_examples) for c in a.clients] == \
               [(c.client_id, c.status, c.uplink_bytes, c.num_examples) for c in b.clients]
    for store in ("states", "personal_states"):  # per-client state (c_i, heads) came back to the driver
        ra, sa = getattr(ray_t.device, store), getattr(sim_t.device, store)
        assert ra.clients() == sa.clients()
        for c in sa.clients():
            for k, t in sa.get(c).items():
                torch.testing.assert_close(ra.get(c)[k], t, rtol=0, atol=1e-5)
    if feature in ("scaffold", "fedper"):
        assert len(sim_t.device.states if feature == "scaffold" else sim_t.device.personal_states) > 0


@pytest.mark.slow
def test_ray_backend_records_probes_and_staleness_like_the_simulation(local_ray):
    """The two server-side features above whose records come from the devices: probe checks
    and FedBuff's staleness are in Ray's records as in the simulation's."""
    base = {"seed": 3, "data": {"dataset": "digits", "clients": 16}, "server": {"rounds": 3, "cohort": 4},
            "client": {"local_epochs": 1}, "monitoring": {"detectors": []}}
    cfg = {**base, "probes": {"clients": 2}}
    _, ray_sum = _run("ray", cfg)
    _, sim_sum = _run("simulation", cfg)
    probe = [[c.client_id for c in r.clients if c.status == "probe"] for r in ray_sum.records]
    assert probe == [[c.client_id for c in r.clients if c.status == "probe"] for r in sim_sum.records] and all(probe)
    assert [r.extra.get("probe_clients") for r in ray_sum.records] == [r.extra.get("probe_clients") for r in sim_sum.records]
    cfg = {**base, "server": {**base["server"], "mode": "async", "concurrency": 4, "buffer_size": 2}}
    _, ray_sum = _run("ray", cfg)
    _, sim_sum = _run("simulation", cfg)
    stale = [r.extra["staleness_max"] for r in ray_sum.records]
    assert stale == [r.extra["staleness_max"] for r in sim_sum.records] and max(stale) >= 1


@pytest.mark.slow
def test_ray_backend_runs_a_canary_to_the_simulations_decision(local_ray):
    from fleetlearn.engine.canary import build_run

    cfg = {"seed": 3, "data": {"dataset": "digits", "clients": 20}, "server": {"rounds": 4, "cohort": 10},
           "client": {"local_epochs": 1}, "monitoring": {"detectors": []},
           "canary": {"set": ["client.lr=1.5"], "fraction": 0.3, "start_round": 2, "rounds": 2, "window": 1}}
    out = {}
    for backend in ("ray", "simulation"):
        run = build_run(load_config({**cfg, "engine": {"backend": backend, "ray_workers": 2 if backend == "ray" else None}}),
                        store=False)
        try:
            summary = run.run()
        finally:
            run.transport.close()  # the arm that ended in production; the other closed at the decision
        out[backend] = (summary, run)
    (ray_sum, ray_run), (sim_sum, sim_run) = out["ray"], out["simulation"]
    def decisions(summary):
        return [(d["round"], d["decision"], d["candidate_versions"], d["production"], d["candidate"])
                for d in (r.extra.get("canary", {}).get("decision") for r in summary.records) if d]

    ray_d, sim_d = decisions(ray_sum), decisions(sim_sum)
    assert sim_d and [d[:3] for d in ray_d] == [d[:3] for d in sim_d]  # the same decision, rounds and versions
    for a, b in zip(ray_d, sim_d):  # on metrics equal within the Ray bound above
        assert a[3:] == pytest.approx(b[3:], abs=1e-4)
    assert ray_sum.final_accuracy == pytest.approx(sim_sum.final_accuracy, abs=1e-4)


@pytest.mark.slow
def test_ray_backend_fedbuff_same_as_in_process(local_ray):
    """FedBuff's overlapping dispatches (Transport.open_group) on Ray: the virtual clock's
    arrival order, hence the same staleness and model as in process."""
    config = {"seed": 3, "data": {"clients": 20}, "client": {"local_steps": 3, "batch_size": 4},
              "server": {"rounds": 3, "cohort": 4, "mode": "async", "concurrency": 6, "buffer_size": 3}}
    ray_coord, ray_sum = _run("ray", config)
    sim_coord, sim_sum = _run("simulation", config)
    assert ray_sum.rounds == sim_sum.rounds == 3
    assert [r.extra["staleness_mean"] for r in ray_coord.records] == [r.extra["staleness_mean"] for r in sim_coord.records]
    assert any(r.extra["staleness_max"] > 0 for r in sim_coord.records)
    assert torch.allclose(ray_coord.params, sim_coord.params, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [False, True], ids=["one_rank", "lora_ranks"])
def test_ray_backend_fine_tunes_a_pretrained_model_with_lora(local_ray, tmp_path_factory, ranks):
    """A tiny random BERT with LoRA adapters (one rank, then heterogeneous ranks) on Ray: the
    simulation's model, and each worker process loaded the frozen base from its files exactly
    once (the learner travels as its recipe, not with the base; a base pickled by value would
    load 0 times, one loaded per task more than once)."""
    pytest.importorskip("transformers", reason="the [lora] extra is not installed")
    import os
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "foundation"))
    from support import tiny_bert, write_tiny_corpus

    from fleetlearn.learners.hf import encoder_loads

    bert = tiny_bert(tmp_path_factory.mktemp("bert"))
    spam = write_tiny_corpus(tmp_path_factory.mktemp("spam"))
    model = {"name": f"hf:{bert}", "lora_rank": 2}
    if ranks:
        model = {"name": f"hf:{bert}", "lora_ranks": [4, 2], "width_rule": "round_robin"}
    config = {"seed": 1, "data": {"dataset": "spam_assassin", "path": str(spam), "clients": 6, "text_seq_len": 16},
              "model": model, "client": {"local_steps": 3, "batch_size": 8, "lr": 0.05},
              "server": {"rounds": 2, "cohort": 4}, "monitoring": {"detectors": []}}
    cfg = load_config({**config, "engine": {"backend": "ray", "ray_workers": 2}})
    coord = build_coordinator(cfg, store=False)
    start = coord.params.clone()
    try:
        ray_sum = coord.run()
        loads = [ray.get(w.__ray_call__.remote(lambda self: (os.getpid(), encoder_loads()))) for w in coord.transport.workers]
    finally:
        coord.transport.close()
    sim_coord, sim_sum = _run("simulation", config)
    assert ray_sum.rounds == sim_sum.rounds == 2 and coord.version == sim_coord.version > 0
    torch.testing.assert_close(coord.params, sim_coord.params, rtol=0, atol=1e-5)
    assert not torch.equal(coord.params, start)
    for a, b in zip(ray_sum.records, sim_sum.records):
        assert [(c.client_id, c.status, c.uplink_bytes, c.width) for c in a.clients] == \
               [(c.client_id, c.status, c.uplink_bytes, c.width) for c in b.clients]
    if ranks:
        assert {c.width for r in ray_sum.records for c in r.clients} == {1.0, 0.5}
    # Two worker processes (not this one), each trained in both rounds, each read the base once.
    assert len({pid for pid, _ in loads}) == 2 and os.getpid() not in {pid for pid, _ in loads}
    assert [n for _, n in loads] == [{f"hf:{bert}": 1}] * 2, loads
