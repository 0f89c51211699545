"""LoRA over the network: `fleetlearn server` and three real `fleetlearn client` processes on
127.0.0.1 with TLS and tokens.  Each client loads the (tiny) base model from its own files;
the wire carries the adapters and the head only (bytes asserted from the run store)."""

from __future__ import annotations

import sys
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
