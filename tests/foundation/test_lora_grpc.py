"""LoRA over the network: `fleetlearn server` and three real `fleetlearn client` processes on
127.0.0.1 with TLS and tokens.  Each client loads the (tiny) base model from its own files;
the wire carries the adapters and the head only (bytes asserted from the run store)."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "transport"))
from test_grpc_end_to_end import finish, free_port, setup, start_clients, start_server, wait_listening  # noqa: E402

from fleetlearn.ops import RunStore  # noqa: E402

CONFIG = """
seed = 1
[data]
dataset = "spam_assassin"
path = "{spam}"
clients = 3
text_seq_len = 16
[model]
name = "hf:{bert}"
lora_rank = 2
[client]
local_steps = 3
batch_size = 8
lr = 0.05
[server]
rounds = 2
cohort = 3
[engine]
threads = 1
[monitoring]
detectors = []
"""


@pytest.mark.slow
def test_three_client_processes_send_only_adapters(tmp_path, bert_dir, spam_dir):
    from fleetlearn.compression import parse_chain
    from fleetlearn.learners.hf import LoraLearner, full_model_params, lora_classifier_factory

    tokens = setup(tmp_path, rounds=2)  # certs and three tokens (writes the digits config, replaced below)
    (tmp_path / "run.toml").write_text(CONFIG.format(spam=spam_dir, bert=bert_dir))
    port = free_port()
    server = start_server(tmp_path, port, str(tmp_path / "run.toml"))
    wait_listening(port)
    clients = start_clients(tmp_path, port, tokens)
    summary = finish(server, clients, timeout=300)
    assert summary["rounds"] == 2 and summary["failed_rounds"] == 0
    recs = RunStore.open(summary["run_dir"]).records()
    assert all(r.accepted == 3 for r in recs)
    d = LoraLearner(lora_classifier_factory(f"hf:{bert_dir}", 16, 2, 2, 16.0, ["query", "value"])).spec.dim
    one_update = len(parse_chain("none").encode(__import__("torch").zeros(d))[0])  # adapters + head, float32, wire header
    for r in recs:
        assert r.uplink_bytes == 3 * one_update, (r.uplink_bytes, one_update)
    assert one_update < 4 * full_model_params(f"hf:{bert_dir}", 2) / 10  # nothing of the base travels


# Heterogeneous ranks: full_width_memory_mb = 400 and the tiny BERT's adapters on query and
# value (2 layers): rank r sends 256 r adapter floats + the 66 of the head, so rank 4 needs
# 400 MiB, rank 2 ~212 and rank 1 ~118.  The three clients declare 500, 250 and 150 MiB: ranks
# 4, 2, 1 by the memory rule.  (Round robin over their ids 1, 2, 3 would give 2, 1, 4: the
# test catches a server that ignores the run's width_rule.)
RANKS_CONFIG = """
seed = 1
[data]
dataset = "spam_assassin"
path = "{spam}"
clients = 4
text_seq_len = 16
[model]
name = "hf:{bert}"
lora_ranks = [4, 2, 1]
width_rule = "memory"
full_width_memory_mb = 400
[client]
local_steps = 3
batch_size = 8
lr = 0.05
[server]
rounds = 2
cohort = 3
deadline_s = 120
[engine]
threads = 1
[monitoring]
detectors = []
"""
MEMORY = [500, 250, 150]


@pytest.mark.slow
def test_heterogeneous_ranks_over_grpc_as_in_the_simulation(tmp_path, bert_dir, spam_dir):
    """Three `fleetlearn client` processes declare their memory; the server gives each its rank
    by the run's memory rule, sends and receives only that rank's adapters (+ the head), and
    aggregates them by zero-padding: the model the simulation computes for the same clients."""
    import numpy as np
    import torch
    from test_grpc_end_to_end import fl

    from fleetlearn.compression import parse_chain
    from fleetlearn.config import load_config
    from fleetlearn.engine import build_coordinator

    tokens = setup(tmp_path, rounds=2)
    (tmp_path / "run.toml").write_text(RANKS_CONFIG.format(spam=spam_dir, bert=bert_dir))
    port = free_port()
    server = start_server(tmp_path, port, str(tmp_path / "run.toml"))
    wait_listening(port)
    # Client i (token site{i}, client id i + 1) trains partition slot i + 1: the simulation below
    # leaves slot 0 out and trains the same slots under the same ids.
    clients = [fl("client", "--server", f"127.0.0.1:{port}", "--token", tok, "--config", str(tmp_path / "run.toml"),
                  "--client-index", str(i + 1), "--memory-mb", str(MEMORY[i]), "--tls-ca", str(tmp_path / "certs" / "ca.pem"),
                  "--give-up-after", "300", cwd=tmp_path) for i, tok in enumerate(tokens)]
    summary = finish(server, clients, timeout=300)
    assert summary["rounds"] == 2 and summary["failed_rounds"] == 0
    store = RunStore.open(summary["run_dir"])
    recs = store.records()

    cfg = load_config(tomllib.loads(RANKS_CONFIG.format(spam=spam_dir, bert=bert_dir)))
    sim = build_coordinator(cfg, store=False)
    plan = sim.learner.plan
    assert plan.values() == [4, 2, 1]
    width = {cid: float(w) for cid, w in zip((1, 2, 3), plan.width_for_memory(np.array(MEMORY, dtype=float)))}
    assert [plan.rank_of[width[c]] for c in (1, 2, 3)] == [4, 2, 1]  # the memory rule gives three different ranks
    size = {w: len(parse_chain("none").encode(torch.zeros(plan.sub_dim(w)))[0]) for w in plan.widths}
    assert {w: plan.sub_dim(w) for w in plan.widths} == {1.0: 4 * 256 + 66, 0.5: 2 * 256 + 66, 0.25: 256 + 66}
    for r in recs:
        assert r.accepted == 3
        for c in r.clients:
            assert c.width == width[c.client_id]
            # Each client received and sent its rank's adapters and the head, nothing more.
            assert c.downlink_bytes == size[c.width] and c.uplink_bytes == size[c.width], (c.client_id, c.width)
        assert r.uplink_bytes == sum(size[w] for w in width.values())

    # The simulation, same seed, slots, ids and ranks: the same zero-padded model.
    sim.excluded_clients = {0}
    sim.learner.client_widths = np.array([1.0] + [width[c] for c in (1, 2, 3)])
    start = sim.params.clone()
    sim.run()
    _, params, _ = store.load_checkpoint()
    assert params.shape == start.shape == (plan.dim,)
    # Each client trains alone there and in a batched cohort here: equal up to float rounding.
    torch.testing.assert_close(params, sim.params, rtol=0, atol=1e-5)
    # Zero-padding: components past rank 2 were trained by the rank-4 client alone; past rank 1,
    # by ranks 4 and 2; all of them moved, and the head by all three.
    moved = (params - start).abs() > 0
    only4 = torch.ones(plan.dim, dtype=torch.bool)
    only4[plan.index[0.5]] = False
    assert moved[only4].any() and moved[plan.index[0.25]].any()


def test_a_rank_larger_than_a_layer_is_refused_by_server_and_client(tmp_path, bert_dir, spam_dir, capsys):
    """model.lora_ranks with a rank above the tiny BERT's 32 x 32 query/value layers: `fleetlearn
    server` and `fleetlearn client` both stop before listening or dialling, one line, exit 2."""
    from fleetlearn.cli import main

    cfg = tmp_path / "run.toml"
    cfg.write_text(RANKS_CONFIG.format(spam=spam_dir, bert=bert_dir).replace("lora_ranks = [4, 2, 1]", "lora_ranks = [64, 2]"))
    want = r"model\.lora_ranks = \[64, 2\]: rank 64 exceeds the layer '.*(query|value)' \(32 x 32\).*at most min\(in, out\) = 32"
    assert main(["server", str(cfg), "--listen", "127.0.0.1:0", "--state", str(tmp_path / "state"),
                 "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert re.search(want, err), err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no run was created
    assert main(["client", "--server", "127.0.0.1:1", "--token", "t", "--config", str(cfg), "--client-index", "1",
                 "--memory-mb", "500", "--give-up-after", "5"]) == 2
    err = capsys.readouterr().err
    assert re.search(want, err), err
